//! Package file names: what is allowed, and the model/version/build time that Autel- and
//! DJI-style names carry (contract §3).

use std::fmt;

use chrono::{DateTime, NaiveDateTime, Utc};

use super::ProductVersion;

/// A validated package file name: 1–255 bytes, no path separators, no `..`, no control
/// characters. Used as the last segment of every download URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileName(String);

/// Why a file name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid file name {0:?}: it must be 1-255 bytes with no '/', '\\', '..' or control characters"
)]
pub struct FileNameError(pub String);

impl FileName {
    /// Validates a client-supplied name.
    pub fn parse(s: &str) -> Result<Self, FileNameError> {
        let bad = s.is_empty()
            || s.len() > 255
            || s.contains(['/', '\\'])
            || s.contains("..")
            || s.chars().any(char::is_control)
            || s.trim() != s;
        if bad {
            Err(FileNameError(s.chars().take(300).collect()))
        } else {
            Ok(Self(s.to_string()))
        }
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name percent-encoded for use as one URL path segment.
    pub fn url_segment(&self) -> String {
        let mut out = String::with_capacity(self.0.len());
        for b in self.0.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~()+".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }
}

impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a package's file name says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameFacts {
    /// Model, as spelled in the name.
    pub model: String,
    /// Version text, as spelled in the name.
    pub version: String,
    /// Build time (Autel names carry one).
    pub build_time: Option<DateTime<Utc>>,
}

/// Parses model, version and build time from an Autel-style
/// `<Model>-V<version>-<YYYYMMDDhhmmss><anything>` or DJI-style `<model>_<version>[_…].zip` name.
///
/// ```
/// use fwrepo::domain::parse_name_facts;
/// let f = parse_name_facts("EvoNest-V1.2.0.69-20231215094829.Encrypt.uav").unwrap();
/// assert_eq!((f.model.as_str(), f.version.as_str()), ("EvoNest", "1.2.0.69"));
/// assert_eq!(f.build_time.unwrap().to_rfc3339(), "2023-12-15T09:48:29+00:00");
/// let f = parse_name_facts("WM265E_07.01.10.05.zip").unwrap();
/// assert_eq!((f.model.as_str(), f.version.as_str()), ("WM265E", "07.01.10.05"));
/// assert!(parse_name_facts("firmware.bin").is_none());
/// ```
pub fn parse_name_facts(name: &str) -> Option<NameFacts> {
    parse_autel(name).or_else(|| parse_dji(name))
}

fn parse_autel(name: &str) -> Option<NameFacts> {
    let mut search_from = 0;
    while let Some(pos) = name[search_from..].find("-V") {
        let at = search_from + pos;
        search_from = at + 2;
        let model = &name[..at];
        let rest = &name[at + 2..];
        let Some(dash) = rest.find('-') else { continue };
        let version = &rest[..dash];
        let stamp = rest[dash + 1..].get(..14);
        let (Some(stamp), false) = (stamp, model.is_empty()) else {
            continue;
        };
        if !stamp.bytes().all(|b| b.is_ascii_digit()) || ProductVersion::parse(version).is_err() {
            continue;
        }
        let build_time = NaiveDateTime::parse_from_str(stamp, "%Y%m%d%H%M%S")
            .ok()
            .map(|t| t.and_utc());
        return Some(NameFacts {
            model: model.to_string(),
            version: version.to_string(),
            build_time,
        });
    }
    None
}

fn parse_dji(name: &str) -> Option<NameFacts> {
    let lower = name.to_ascii_lowercase();
    let stem = &name[..lower.strip_suffix(".zip")?.len()];
    let mut segments = stem.split('_');
    let model = segments.next()?;
    let version = segments.next()?;
    if model.is_empty() || ProductVersion::parse(version).is_err() {
        return None;
    }
    Some(NameFacts {
        model: model.to_string(),
        version: version.to_string(),
        build_time: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        for ok in ["a.bin", "WM265E_07.01.10.05.zip", "x y.bin", "固件.bin"] {
            assert!(FileName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "..",
            "a..b",
            "x\u{1}",
            "a\\b",
            " lead",
            "tab\t",
            "new\nline",
        ] {
            assert!(FileName::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            FileName::parse("a b%.bin").unwrap().url_segment(),
            "a%20b%25.bin"
        );
    }

    #[test]
    fn names_with_versions() {
        let f = parse_name_facts("wm245_1.00.223.zip").unwrap();
        assert_eq!(f.model, "wm245");
        assert_eq!(f.version, "1.00.223");
        let f = parse_name_facts("dock_10.01.0205_beta.ZIP").unwrap();
        assert_eq!(f.version, "10.01.0205");
        let f = parse_name_facts("EVO-Nest-V2.0-20240101000000").unwrap();
        assert_eq!(f.model, "EVO-Nest");
        assert_eq!(f.version, "2.0");
        assert!(parse_name_facts("EvoNest-V1.2-2023.uav").is_none());
        assert!(parse_name_facts("model_abc.zip").is_none());
        assert!(parse_name_facts("model_1.2.tar").is_none());
    }
}
