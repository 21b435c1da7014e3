//! Product versions: stored as given, compared numerically part by part (contract §3).

use std::cmp::Ordering;
use std::fmt;

/// Why a version string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    /// Empty, a non-numeric part, an empty part, or a part too large.
    #[error("version {0:?} has a non-numeric or empty part")]
    NonNumeric(String),
}

/// A product version: the original text plus its numeric normal form.
///
/// ```
/// use fwrepo::domain::ProductVersion;
/// let a = ProductVersion::parse("10.01.0205").unwrap();
/// let b = ProductVersion::parse("10.1.2.5").unwrap();
/// assert_eq!(a, b);
/// assert!(ProductVersion::parse("1.2").unwrap() == ProductVersion::parse("1.2.0").unwrap());
/// assert!(ProductVersion::parse("1.10").unwrap() > ProductVersion::parse("1.9").unwrap());
/// ```
#[derive(Clone, Debug)]
pub struct ProductVersion {
    raw: String,
    parts: Vec<u64>,
}

/// At most this many dot-separated parts.
const MAX_PARTS: usize = 16;

impl ProductVersion {
    /// Parses a version: dot-separated decimal parts; a part of exactly four digits in third
    /// position splits 2+2; trailing zero parts do not count.
    pub fn parse(raw: &str) -> Result<Self, VersionError> {
        let raw = raw.trim();
        let err = || VersionError::NonNumeric(raw.to_string());
        if raw.is_empty() {
            return Err(err());
        }
        let mut parts = Vec::new();
        for (i, part) in raw.split('.').enumerate() {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) || part.len() > 18 {
                return Err(err());
            }
            if i == 2 && part.len() == 4 {
                parts.push(part[..2].parse().map_err(|_| err())?);
                parts.push(part[2..].parse().map_err(|_| err())?);
            } else {
                parts.push(part.parse().map_err(|_| err())?);
            }
        }
        if parts.len() > MAX_PARTS {
            return Err(err());
        }
        while parts.last() == Some(&0) {
            parts.pop();
        }
        Ok(Self {
            raw: raw.to_string(),
            parts,
        })
    }

    /// The version exactly as given (sent on the wire as stored).
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The numeric normal form as text, e.g. `10.1.2.5` (`0` for all zeros).
    pub fn normalized(&self) -> String {
        if self.parts.is_empty() {
            return "0".into();
        }
        self.parts
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Big-endian key bytes that sort like the versions do.
    pub fn sort_key(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.parts.len() * 8);
        for p in &self.parts {
            out.extend_from_slice(&p.to_be_bytes());
        }
        out
    }
}

impl PartialEq for ProductVersion {
    fn eq(&self, other: &Self) -> bool {
        self.parts == other.parts
    }
}
impl Eq for ProductVersion {}

impl PartialOrd for ProductVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ProductVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        self.parts.cmp(&other.parts)
    }
}

impl fmt::Display for ProductVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> ProductVersion {
        ProductVersion::parse(s).unwrap()
    }

    #[test]
    fn compares_numerically() {
        assert!(v("1.10.0") > v("1.9.9"));
        assert!(v("07.01.10.05") > v("07.01.10.04"));
        assert_eq!(v("07.01.10.05"), v("7.1.10.5"));
        assert_eq!(v("10.01.0205"), v("10.01.02.05"));
        assert_eq!(v("1.2"), v("1.2.0.0"));
        assert!(v("1.2.0.69") > v("1.2"));
        assert_eq!(v("1.00.223").normalized(), "1.0.223");
        assert_eq!(v("0.0").normalized(), "0");
    }

    #[test]
    fn four_digits_split_only_in_third_position() {
        assert_eq!(v("1.2.0304").normalized(), "1.2.3.4");
        assert_eq!(v("1.0203.4").normalized(), "1.203.4");
        assert_eq!(v("1.2.30405").normalized(), "1.2.30405");
    }

    #[test]
    fn rejects_non_numeric() {
        for bad in ["", "1.a", "1..2", "v1.2", "1.2-beta", "1.2.", " . "] {
            assert!(ProductVersion::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sort_key_orders_like_versions() {
        assert!(v("1.10").sort_key() > v("1.9").sort_key());
        assert_eq!(v("1.2").sort_key(), v("1.2.0").sort_key());
    }
}
