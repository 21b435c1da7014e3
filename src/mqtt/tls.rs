//! TLS to an external broker (`mqtts://`): the server is checked against the system's roots or
//! a CA bundle (`--mqtt-ca-file`), and fwrepo may present a client certificate
//! (`--mqtt-client-cert` + `--mqtt-client-key`, PEM) to brokers that require one.

use std::path::PathBuf;
use std::sync::Arc;

use rumqttc::tokio_rustls::rustls::pki_types::pem::PemObject;
use rumqttc::tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rumqttc::tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// Where the TLS material comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MqttTls {
    /// PEM bundle of CAs to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key: Option<PathBuf>,
}

impl MqttTls {
    /// Builds the rustls client configuration, reading every file now.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let certs = read_certs(path, "mqtt_ca_file")?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!("mqtt_ca_file {}: no usable CA", path.display()));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(
                        "mqtts:// needs CA certificates: none found on this system; set mqtt_ca_file"
                            .into(),
                    );
                }
            }
        }
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let config = match (&self.client_cert, &self.client_key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "mqtt_client_cert")?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("mqtt_client_key {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("mqtt client certificate: {e}"))?
            }
            _ => return Err("mqtt_client_cert and mqtt_client_key go together".into()),
        };
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &PathBuf, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = MqttTls {
            ca_file: Some(dir.path().join("nope.pem")),
            ..MqttTls::default()
        };
        assert!(
            missing
                .client_config()
                .unwrap_err()
                .contains("mqtt_ca_file")
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let e = MqttTls {
            ca_file: Some(empty),
            ..MqttTls::default()
        }
        .client_config()
        .unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let half = MqttTls {
            client_cert: Some(dir.path().join("c.pem")),
            ..MqttTls::default()
        };
        assert!(half.client_config().unwrap_err().contains("go together"));
    }
}
