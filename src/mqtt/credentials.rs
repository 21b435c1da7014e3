//! Per-gateway credentials for the embedded broker (`--mqtt-auth on`). Each client's user name
//! must equal its client id (so a dock cannot take over another's session), and its password
//! is derived from the user name with a key kept in the data directory
//! (`mqtt-credentials.key`, 0600): HMAC-SHA256(key, user name), base64url. Nothing to store
//! per dock; `fwrepo mqtt-password SN…` prints the passwords to provision, and a new key
//! (delete the file, restart) revokes them all. Topic ACLs need Mosquitto or EMQX (deploy/).

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The key file in the data directory.
pub const KEY_FILE: &str = "mqtt-credentials.key";

/// Derives and checks gateway passwords. Cheap to clone.
#[derive(Clone)]
pub struct GatewayCredentials {
    key: std::sync::Arc<Vec<u8>>,
}

impl std::fmt::Debug for GatewayCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayCredentials")
    }
}

impl GatewayCredentials {
    /// Loads `<data_dir>/mqtt-credentials.key`, creating it (mode 0600) if missing.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<GatewayCredentials> {
        let path = data_dir.join(KEY_FILE);
        let key = crate::secrets::load_or_create_key(&path)?;
        Ok(GatewayCredentials {
            key: std::sync::Arc::new(key),
        })
    }

    /// Loads an existing key file (the simulator and `fwrepo mqtt-password`).
    pub fn load(path: &Path) -> std::io::Result<GatewayCredentials> {
        let key = crate::secrets::read_key(path)?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{}: no such key file", path.display()),
            )
        })?;
        Ok(GatewayCredentials {
            key: std::sync::Arc::new(key),
        })
    }

    fn mac(&self, user: &str) -> HmacSha256 {
        // HMAC takes keys of any length: new_from_slice cannot fail.
        let mut mac = match HmacSha256::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        mac.update(b"fwrepo-mqtt\0");
        mac.update(user.as_bytes());
        mac
    }

    /// The password of client `user`.
    pub fn password(&self, user: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(user).finalize().into_bytes())
    }

    /// Whether a CONNECT may proceed: user name = client id, and the password matches
    /// (compared in constant time).
    pub fn check(&self, client_id: &str, user: &str, password: &str) -> bool {
        if client_id.is_empty() || user != client_id {
            return false;
        }
        let Ok(given) = URL_SAFE_NO_PAD.decode(password) else {
            return false;
        };
        self.mac(user).verify_slice(&given).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_bind_the_client_id() {
        let dir = tempfile::tempdir().unwrap();
        let c = GatewayCredentials::load_or_create(dir.path()).unwrap();
        let p = c.password("DOCK1");
        assert!(c.check("DOCK1", "DOCK1", &p));
        assert!(!c.check("DOCK2", "DOCK1", &p), "another client id");
        assert!(!c.check("DOCK2", "DOCK2", &p), "another dock's password");
        assert!(!c.check("DOCK1", "DOCK1", "nope"));
        assert!(!c.check("", "", &c.password("")));
        let again = GatewayCredentials::load(&dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(again.password("DOCK1"), p);
    }
}
