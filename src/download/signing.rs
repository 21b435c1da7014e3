//! Signed, device-bound download URLs. The `/dl/` URL an `ota_create` carries holds a path
//! segment `{expiry}-{signature}` before the file name (so `wget` and `curl -O` still save
//! under the file name): HMAC-SHA256 over task id, device serial, firmware id and expiry, with
//! a key kept in the data directory. A URL leaked from one dock does not serve another device,
//! another task or another firmware, and stops working at its expiry (default 7 days: long
//! enough for a slow rollout with retries, so a resume never fails half-way).
//!
//! Rotation: rename `url-signing.key` to `url-signing.key.previous` and restart; fwrepo
//! creates a new key and still accepts URLs signed with the previous one until they expire.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The key file in the data directory.
pub const KEY_FILE: &str = "url-signing.key";
/// The previous key, accepted for verification only.
pub const PREVIOUS_KEY_FILE: &str = "url-signing.key.previous";
/// What names the previous key beside a key file.
const PREVIOUS_SUFFIX: &str = ".previous";

/// The route of a device's signed download URL (`http` registers it, [`signed_url`] builds
/// it): the signature is a path segment before the file name, so `wget` and `curl -O` still
/// save under the file name.
pub const SIGNED_ROUTE: &str = "/dl/{task_id}/{sn}/{signature}/{file_name}";
/// The same without a signature (needs a token).
pub const UNSIGNED_ROUTE: &str = "/dl/{task_id}/{sn}/{file_name}";

/// A device's download URL under `base` (no trailing slash), as [`SIGNED_ROUTE`] reads it.
pub fn signed_url(base: &str, task_id: &str, sn: &str, signature: &str, file: &str) -> String {
    format!("{base}/dl/{task_id}/{sn}/{signature}/{file}")
}

/// Why a signed URL is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Malformed, tampered with, or made for another task, device or firmware.
    #[error("the download URL's signature is invalid")]
    Invalid,
    /// Genuine but past its expiry.
    #[error("the download URL expired")]
    Expired,
}

/// Signs and checks `/dl/` URLs. Cheap to clone.
#[derive(Clone)]
pub struct UrlSigner {
    /// The current key first, then the previous one.
    keys: Vec<Vec<u8>>,
    ttl: chrono::Duration,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlSigner").field("ttl", &self.ttl).finish()
    }
}

impl UrlSigner {
    /// A signer with these keys (current first).
    pub fn new(keys: Vec<Vec<u8>>, ttl: std::time::Duration) -> UrlSigner {
        UrlSigner {
            keys,
            ttl: chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(7)),
        }
    }

    /// Loads the key from `data_dir` (creating it, mode 0600, if missing) and the previous
    /// one if present.
    pub fn load_or_create(data_dir: &Path, ttl: std::time::Duration) -> std::io::Result<UrlSigner> {
        Self::from_file(&data_dir.join(KEY_FILE), ttl)
    }

    /// Loads the key from `path` (creating it, mode 0600, if missing: of replicas starting
    /// together on a shared file, the first one's key is kept) and the previous one from
    /// `<path>.previous` if present.
    pub fn from_file(path: &Path, ttl: std::time::Duration) -> std::io::Result<UrlSigner> {
        let current = crate::secrets::load_or_create_key(path)?;
        let mut keys = vec![current];
        let mut previous = path.as_os_str().to_owned();
        previous.push(PREVIOUS_SUFFIX);
        if let Some(previous) = crate::secrets::read_key(Path::new(&previous))? {
            keys.push(previous);
        }
        Ok(UrlSigner::new(keys, ttl))
    }

    fn mac(key: &[u8], task_id: &str, sn: &str, firmware_id: &str, expiry: i64) -> HmacSha256 {
        // Key length is unrestricted for HMAC: new_from_slice cannot fail.
        let mut mac = match HmacSha256::new_from_slice(key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        };
        mac.update(format!("fwrepo-dl\n{task_id}\n{sn}\n{firmware_id}\n{expiry}").as_bytes());
        mac
    }

    /// The path segment for a device's URL, valid for the configured lifetime from `now`.
    pub fn sign(&self, task_id: &str, sn: &str, firmware_id: &str, now: DateTime<Utc>) -> String {
        let expiry = (now + self.ttl).timestamp();
        let key = self.keys.first().map(Vec::as_slice).unwrap_or_default();
        let tag = Self::mac(key, task_id, sn, firmware_id, expiry)
            .finalize()
            .into_bytes();
        format!("{expiry}-{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks a segment made by [`UrlSigner::sign`] for this task, device and firmware.
    pub fn verify(
        &self,
        task_id: &str,
        sn: &str,
        firmware_id: &str,
        segment: &str,
        now: DateTime<Utc>,
    ) -> Result<(), SignatureError> {
        let (expiry, tag) = segment.split_once('-').ok_or(SignatureError::Invalid)?;
        let expiry: i64 = expiry.parse().map_err(|_| SignatureError::Invalid)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| SignatureError::Invalid)?;
        let genuine = self.keys.iter().any(|key| {
            Self::mac(key, task_id, sn, firmware_id, expiry)
                .verify_slice(&tag)
                .is_ok()
        });
        if !genuine {
            return Err(SignatureError::Invalid);
        }
        if now.timestamp() > expiry {
            return Err(SignatureError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_task_device_firmware_and_expiry() {
        let s = UrlSigner::new(vec![vec![7; 32]], std::time::Duration::from_secs(60));
        let now = Utc::now();
        let seg = s.sign("T1", "DOCK1", "FW1", now);
        assert_eq!(s.verify("T1", "DOCK1", "FW1", &seg, now), Ok(()));
        for (t, sn, fw) in [
            ("T2", "DOCK1", "FW1"),
            ("T1", "DOCK2", "FW1"),
            ("T1", "DOCK1", "FW2"),
        ] {
            assert_eq!(s.verify(t, sn, fw, &seg, now), Err(SignatureError::Invalid));
        }
        // One character changed, the expiry moved, garbage.
        let mut chars: Vec<char> = seg.chars().collect();
        let last = chars.len() - 1;
        chars[last] = if chars[last] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert_eq!(
            s.verify("T1", "DOCK1", "FW1", &tampered, now),
            Err(SignatureError::Invalid)
        );
        let (exp, tag) = seg.split_once('-').unwrap();
        let moved = format!("{}-{tag}", exp.parse::<i64>().unwrap() + 3600);
        assert_eq!(
            s.verify("T1", "DOCK1", "FW1", &moved, now),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            s.verify("T1", "DOCK1", "FW1", "x", now),
            Err(SignatureError::Invalid)
        );
        // Genuine but late.
        let later = now + chrono::Duration::seconds(61);
        assert_eq!(
            s.verify("T1", "DOCK1", "FW1", &seg, later),
            Err(SignatureError::Expired)
        );
    }

    #[test]
    fn keys_are_created_private_and_the_previous_one_still_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = std::time::Duration::from_secs(3600);
        let old = UrlSigner::load_or_create(dir.path(), ttl).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let now = Utc::now();
        let seg = old.sign("T", "S", "F", now);
        assert_eq!(
            UrlSigner::load_or_create(dir.path(), ttl)
                .unwrap()
                .verify("T", "S", "F", &seg, now),
            Ok(())
        );
        // Rotation: the old key becomes the previous one; a new key is made.
        std::fs::rename(
            dir.path().join(KEY_FILE),
            dir.path().join(PREVIOUS_KEY_FILE),
        )
        .unwrap();
        let rotated = UrlSigner::load_or_create(dir.path(), ttl).unwrap();
        assert_eq!(rotated.verify("T", "S", "F", &seg, now), Ok(()));
        assert_ne!(rotated.sign("T", "S", "F", now), seg);
    }
}
