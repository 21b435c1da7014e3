//! Pure RFC 9110 logic for a download: conditional requests (`If-None-Match`,
//! `If-Modified-Since`, `If-Range`) and byte ranges. No I/O, no HTTP types: header values in,
//! a [`Plan`] out.

// A list of byte ranges that holds one range is the common case here, not a mistake.
#![allow(clippy::single_range_in_vec_init)]

use std::ops::Range;

use chrono::{DateTime, Utc};

/// At most this many ranges in one request; more is refused (416) rather than served.
pub const MAX_RANGES: usize = 100;

/// The validators of the representation being served.
#[derive(Clone, Debug)]
pub struct Validators {
    /// Strong entity tag, quoted (`"<sha256>"`).
    pub etag: String,
    /// Last modification, whole seconds.
    pub last_modified: DateTime<Utc>,
}

/// The request's conditional and range headers, as raw strings.
#[derive(Clone, Debug, Default)]
pub struct Conditions<'a> {
    /// `Range`.
    pub range: Option<&'a str>,
    /// `If-Range`.
    pub if_range: Option<&'a str>,
    /// `If-None-Match`.
    pub if_none_match: Option<&'a str>,
    /// `If-Modified-Since`.
    pub if_modified_since: Option<&'a str>,
}

/// What to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// 304 Not Modified.
    NotModified,
    /// 200 with the whole file.
    Full,
    /// 206 with these ranges (one: a single part; several: `multipart/byteranges`).
    Partial(Vec<Range<u64>>),
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Result of parsing a `Range` header against a length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// Malformed or not `bytes`: ignore it and serve the whole file (RFC 9110 §14.2).
    Ignore,
    /// Nothing satisfiable, or too many ranges.
    Unsatisfiable,
    /// Satisfiable ranges, half-open, coalesced when they overlap.
    Ranges(Vec<Range<u64>>),
}

/// Decides the answer to a GET (`is_get`) or HEAD for a file of `len` bytes.
///
/// ```
/// use fwrepo::download::range::{plan, Conditions, Plan, Validators};
/// let v = Validators { etag: "\"abc\"".into(), last_modified: chrono::Utc::now() };
/// let c = Conditions { range: Some("bytes=0-9"), ..Default::default() };
/// assert_eq!(plan(100, &v, &c, true), Plan::Partial(vec![0..10]));
/// let c = Conditions { range: Some("bytes=0-9"), if_range: Some("\"other\""), ..Default::default() };
/// assert_eq!(plan(100, &v, &c, true), Plan::Full);
/// ```
pub fn plan(len: u64, v: &Validators, c: &Conditions<'_>, is_get: bool) -> Plan {
    if let Some(inm) = c.if_none_match {
        if etag_list_matches_weak(inm, &v.etag) {
            return Plan::NotModified;
        }
    } else if let Some(ims) = c.if_modified_since.and_then(parse_http_date)
        && v.last_modified.timestamp() <= ims.timestamp()
    {
        return Plan::NotModified;
    }
    let Some(range) = c.range else {
        return Plan::Full;
    };
    if !is_get {
        return Plan::Full;
    }
    if let Some(ir) = c.if_range
        && !if_range_holds(ir, v)
    {
        return Plan::Full;
    }
    match parse_range(range, len) {
        RangeSpec::Ignore => Plan::Full,
        RangeSpec::Unsatisfiable => Plan::Unsatisfiable,
        RangeSpec::Ranges(r) => Plan::Partial(r),
    }
}

fn etag_list_matches_weak(list: &str, etag: &str) -> bool {
    let ours = etag.trim_start_matches("W/");
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == ours)
}

fn if_range_holds(value: &str, v: &Validators) -> bool {
    let value = value.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        // Strong comparison: a weak tag never matches.
        return value == v.etag;
    }
    parse_http_date(value).is_some_and(|d| d.timestamp() == v.last_modified.timestamp())
}

fn parse_http_date(s: &str) -> Option<DateTime<Utc>> {
    httpdate::parse_http_date(s.trim())
        .ok()
        .map(DateTime::<Utc>::from)
}

/// Parses a `Range` header for a representation of `len` bytes.
///
/// ```
/// use fwrepo::download::range::{parse_range, RangeSpec};
/// assert_eq!(parse_range("bytes=-10", 100), RangeSpec::Ranges(vec![90..100]));
/// assert_eq!(parse_range("bytes=100-", 100), RangeSpec::Unsatisfiable);
/// assert_eq!(parse_range("bytes=5-1", 100), RangeSpec::Ignore);
/// ```
pub fn parse_range(header: &str, len: u64) -> RangeSpec {
    let header = header.trim();
    let Some((unit, specs)) = header.split_once('=') else {
        return RangeSpec::Ignore;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeSpec::Ignore;
    }
    let mut ranges = Vec::new();
    let mut count = 0usize;
    for spec in specs.split(',') {
        let spec = spec.trim();
        if spec.is_empty() {
            continue;
        }
        count += 1;
        if count > MAX_RANGES {
            return RangeSpec::Unsatisfiable;
        }
        let Some((first, last)) = spec.split_once('-') else {
            return RangeSpec::Ignore;
        };
        let (first, last) = (first.trim(), last.trim());
        // Digits beyond u64 are a valid, huge position (RFC 9110: a last-pos past the end
        // means "to the end"), not a malformed header.
        let num = |s: &str| -> Option<u64> {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().unwrap_or(u64::MAX))
        };
        match (first.is_empty(), last.is_empty()) {
            (true, true) => return RangeSpec::Ignore,
            (true, false) => {
                let Some(n) = num(last) else {
                    return RangeSpec::Ignore;
                };
                if n > 0 && len > 0 {
                    ranges.push(len.saturating_sub(n)..len);
                }
            }
            (false, _) => {
                let Some(a) = num(first) else {
                    return RangeSpec::Ignore;
                };
                let b = if last.is_empty() {
                    u64::MAX
                } else {
                    match num(last) {
                        Some(b) if b >= a => b,
                        _ => return RangeSpec::Ignore,
                    }
                };
                if a < len {
                    ranges.push(a..b.min(len - 1) + 1);
                }
            }
        }
    }
    if count == 0 {
        return RangeSpec::Ignore;
    }
    if ranges.is_empty() {
        return RangeSpec::Unsatisfiable;
    }
    RangeSpec::Ranges(coalesce_if_overlapping(ranges))
}

/// Keeps the requested order unless two ranges overlap; then sorts and merges them, so no byte
/// is sent twice in one response (no amplification).
fn coalesce_if_overlapping(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut sorted = ranges.clone();
    sorted.sort_by_key(|r| r.start);
    if sorted.windows(2).all(|w| w[0].end <= w[1].start) {
        return ranges;
    }
    ranges.clear();
    for r in sorted {
        match ranges.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => ranges.push(r),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Validators {
        Validators {
            etag: "\"abc\"".into(),
            last_modified: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        }
    }

    fn r(h: &str) -> RangeSpec {
        parse_range(h, 1000)
    }

    #[test]
    fn rfc9110_range_table() {
        use RangeSpec::*;
        let cases: &[(&str, RangeSpec)] = &[
            ("bytes=0-499", Ranges(vec![0..500])),
            ("bytes=500-999", Ranges(vec![500..1000])),
            ("bytes=500-5000", Ranges(vec![500..1000])),
            ("bytes=-500", Ranges(vec![500..1000])),
            ("bytes=-5000", Ranges(vec![0..1000])),
            ("bytes=9500-", Unsatisfiable),
            ("bytes=999-", Ranges(vec![999..1000])),
            ("bytes=0-0,-1", Ranges(vec![0..1, 999..1000])),
            ("bytes=500-600,100-200", Ranges(vec![500..601, 100..201])),
            ("bytes=500-600,601-999", Ranges(vec![500..601, 601..1000])),
            ("bytes=500-700,601-999", Ranges(vec![500..1000])),
            ("bytes=0-10,5-20,0-", Ranges(vec![0..1000])),
            ("bytes=-0", Unsatisfiable),
            ("bytes=1000-2000", Unsatisfiable),
            ("bytes=1000-2000,0-1", Ranges(vec![0..2])),
            ("BYTES=0-1", Ranges(vec![0..2])),
            ("bytes = 0-1 , 3-4", Ranges(vec![0..2, 3..5])),
            ("bytes=5-1", Ignore),
            ("bytes=abc", Ignore),
            ("bytes=1-2-3", Ignore),
            ("bytes=-", Ignore),
            ("bytes=", Ignore),
            ("items=0-1", Ignore),
            ("0-1", Ignore),
            ("bytes=+1-2", Ignore),
            ("bytes=0-99999999999999999999999", Ranges(vec![0..1000])),
            ("bytes=-99999999999999999999999", Ranges(vec![0..1000])),
            ("bytes=99999999999999999999999-", Unsatisfiable),
        ];
        for (h, want) in cases {
            assert_eq!(&r(h), want, "{h}");
        }
    }

    #[test]
    fn too_many_ranges_are_refused() {
        let many: Vec<String> = (0..101).map(|i| format!("{}-{}", i * 2, i * 2)).collect();
        assert_eq!(
            r(&format!("bytes={}", many.join(","))),
            RangeSpec::Unsatisfiable
        );
        let ok: Vec<String> = (0..100).map(|i| format!("{}-{}", i * 2, i * 2)).collect();
        assert!(
            matches!(r(&format!("bytes={}", ok.join(","))), RangeSpec::Ranges(x) if x.len() == 100)
        );
    }

    #[test]
    fn conditionals() {
        let v = v();
        let c = |range, if_range, inm| Conditions {
            range,
            if_range,
            if_none_match: inm,
            if_modified_since: None,
        };
        assert_eq!(
            plan(1000, &v, &c(None, None, Some("\"abc\"")), true),
            Plan::NotModified
        );
        assert_eq!(
            plan(1000, &v, &c(None, None, Some("W/\"abc\", \"x\"")), true),
            Plan::NotModified
        );
        assert_eq!(
            plan(1000, &v, &c(None, None, Some("*")), false),
            Plan::NotModified
        );
        assert_eq!(
            plan(1000, &v, &c(None, None, Some("\"x\"")), true),
            Plan::Full
        );
        let date = httpdate::fmt_http_date(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
        );
        assert_eq!(
            plan(1000, &v, &c(Some("bytes=0-1"), Some(&date), None), true),
            Plan::Partial(vec![0..2])
        );
        assert_eq!(
            plan(1000, &v, &c(Some("bytes=0-1"), Some("\"abc\""), None), true),
            Plan::Partial(vec![0..2])
        );
        assert_eq!(
            plan(
                1000,
                &v,
                &c(Some("bytes=0-1"), Some("W/\"abc\""), None),
                true
            ),
            Plan::Full
        );
        assert_eq!(
            plan(
                1000,
                &v,
                &c(
                    Some("bytes=0-1"),
                    Some("Mon, 01 Jan 2001 00:00:00 GMT"),
                    None
                ),
                true
            ),
            Plan::Full
        );
        assert_eq!(
            plan(1000, &v, &c(Some("bytes=0-1"), None, None), false),
            Plan::Full
        );
        assert_eq!(
            plan(1000, &v, &c(Some("bytes=2000-"), None, None), true),
            Plan::Unsatisfiable
        );
        let ims = Conditions {
            if_modified_since: Some(&date),
            ..Default::default()
        };
        assert_eq!(plan(1000, &v, &ims, true), Plan::NotModified);
    }
}
