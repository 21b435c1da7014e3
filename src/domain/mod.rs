//! Domain newtypes and pure parsing rules shared by every layer: firmware ids, product versions
//! (parsed, normalized and compared as contract §3 orders), checksums, package file names and the
//! model/version/build time carried in Autel- and DJI-style names. Nothing here does I/O.

mod file_name;
mod version;

pub use file_name::{FileName, NameFacts, parse_name_facts};
pub use version::{ProductVersion, VersionError};

use std::fmt;

use serde::{Deserialize, Serialize};

/// Acknowledges a received message once it has been recorded. Dropped without
/// [`Ack::done`], the message stays unacknowledged and its sender delivers it again (MQTT
/// QoS 1 on a persistent session). Cloning a message drops its acknowledgement.
#[derive(Default)]
pub struct Ack(Option<Box<dyn FnOnce(bool) + Send>>);

impl Ack {
    /// An acknowledgement that runs `f(true)` when done, `f(false)` when dropped undone.
    pub fn new(f: impl FnOnce(bool) + Send + 'static) -> Ack {
        Ack(Some(Box::new(f)))
    }

    /// The message is recorded: acknowledge it.
    pub fn done(mut self) {
        if let Some(f) = self.0.take() {
            f(true);
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(false);
        }
    }
}

impl Clone for Ack {
    fn clone(&self) -> Ack {
        Ack(None)
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Ack(pending)"
        } else {
            "Ack(none)"
        })
    }
}

/// Identifier of a firmware record: a ULID (time-ordered, so newest-first is reverse key order).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FirmwareId(String);

impl FirmwareId {
    /// A fresh, monotonic id.
    pub fn generate() -> Self {
        Self(ids::next())
    }

    /// Parses an id from a path or cursor; `None` if it is not a well-formed ULID.
    pub fn parse(s: &str) -> Option<Self> {
        ulid::Ulid::from_string(s).ok().map(|u| Self(u.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FirmwareId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The wall clock the server reads for expiries and timeouts (tokens, signed URLs, OTA
/// timers). In production its offset stays zero; tests advance it instead of sleeping.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Clock {
    /// Now.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        let offset = self.offset_ms.load(std::sync::atomic::Ordering::Relaxed);
        chrono::Utc::now() + chrono::Duration::milliseconds(offset)
    }

    /// Moves this clock (and every holder of a clone) forward by `by`.
    pub fn advance(&self, by: std::time::Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms
            .fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether an I/O error means the file system is full (ENOSPC, EDQUOT): the answer is 507,
/// not a generic failure.
pub fn io_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// `d` scaled by a random factor in [0.5, 1): replicas and restarts that retry do not do it
/// in step.
pub fn jittered(d: std::time::Duration) -> std::time::Duration {
    let mut b = [0u8; 2];
    let r = getrandom::fill(&mut b).map_or(0, |_| u16::from_le_bytes(b));
    d.mul_f64(0.5 + f64::from(r) / 131_072.0)
}

/// Monotonic ULID generation shared by every id type.
pub mod ids {
    use std::sync::Mutex;

    static GENERATOR: Mutex<Option<ulid::Generator>> = Mutex::new(None);

    /// The next ULID as text; strictly increasing within this process.
    pub fn next() -> String {
        let mut guard = match GENERATOR.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let generator = guard.get_or_insert_with(ulid::Generator::new);
        match generator.generate() {
            Ok(id) => id.to_string(),
            // The random part overflowed within one millisecond: fall back to a fresh ULID.
            Err(_) => ulid::Ulid::new().to_string(),
        }
    }
}

/// Why a checksum given by a client was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field} must be {len} hexadecimal characters")]
pub struct ChecksumFormatError {
    /// `md5` or `sha256`.
    pub field: &'static str,
    /// Expected length in hex characters.
    pub len: usize,
}

fn parse_hex(field: &'static str, len: usize, s: &str) -> Result<String, ChecksumFormatError> {
    let s = s.trim();
    if s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(ChecksumFormatError { field, len })
    }
}

/// An MD5 digest as 32 lowercase hex characters (the protocol's spelling).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Md5Hex(String);

impl Md5Hex {
    /// Parses client input (any case); rejects wrong length or non-hex.
    pub fn parse(s: &str) -> Result<Self, ChecksumFormatError> {
        parse_hex("md5", 32, s).map(Self)
    }
    /// From raw digest bytes.
    pub fn from_digest(bytes: &[u8]) -> Self {
        Self(hex::encode(bytes))
    }
    /// Lowercase hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A SHA-256 digest as 64 lowercase hex characters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sha256Hex(String);

impl Sha256Hex {
    /// Parses client input (any case); rejects wrong length or non-hex.
    pub fn parse(s: &str) -> Result<Self, ChecksumFormatError> {
        parse_hex("sha256", 64, s).map(Self)
    }
    /// From raw digest bytes.
    pub fn from_digest(bytes: &[u8]) -> Self {
        Self(hex::encode(bytes))
    }
    /// Lowercase hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_validated_and_lowercased() {
        assert_eq!(
            Md5Hex::parse("D41D8CD98F00B204E9800998ECF8427E")
                .unwrap()
                .as_str(),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
        assert!(Md5Hex::parse("d41d8cd98f00b204e9800998ecf8427").is_err());
        assert!(Md5Hex::parse("z41d8cd98f00b204e9800998ecf8427e").is_err());
        assert!(Sha256Hex::parse("abc").is_err());
    }

    #[test]
    fn ids_increase() {
        let a = FirmwareId::generate();
        let b = FirmwareId::generate();
        assert!(b > a);
        assert_eq!(FirmwareId::parse(a.as_str()), Some(a));
        assert!(FirmwareId::parse("nope").is_none());
    }
}
