//! TLS material shared by the HTTPS listener and the embedded broker's TLS listener: server
//! configurations from PEM files, and the one process-wide rustls crypto provider.

use std::path::Path;

/// The rustls server configuration from a PEM certificate chain and key. The process-wide
/// crypto provider is installed explicitly first (two providers in the dependency tree would
/// otherwise make rustls panic at first use).
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    install_crypto_provider();
    let fail = |what: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", what.display());
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| fail(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(cert, &e))?;
    if chain.is_empty() {
        return Err(fail(cert, &"no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| fail(key, &e))?;
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| fail(key, &e))
}

/// Installs aws-lc-rs as rustls' process-wide provider (once; later calls do nothing).
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}
