//! Abuse limits. On the API: a token bucket per token (per client address, X-Forwarded-For
//! believed only from `--trusted-proxies`, for requests without an accepted token) for every
//! `/api/` request. A caller over its budget gets 429 `rate_limited` with `Retry-After`; others
//! are unaffected. Downloads (`/files/`, `/dl/`) are not counted there: docks behind one
//! carrier NAT share an address. Instead, one address may run `--max-downloads-per-ip`
//! downloads at once (default 1,024: a site of 500 docks and their aircraft behind one NAT).
//! The defaults (burst 1,000, then 200 per second) never throttle a fleet rollout or the
//! benchmarks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Whose budget a request spends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// An accepted token (its id).
    Token(String),
    /// A client address (no accepted token).
    Client(IpAddr),
}

/// Per-caller limiter of API requests. Cheap to clone.
#[derive(Clone)]
pub struct ApiLimiter {
    limiter: Option<Arc<DefaultKeyedRateLimiter<RateKey>>>,
}

impl ApiLimiter {
    /// `per_second` requests per client after a `burst`; 0 = no limit.
    pub fn new(per_second: u32, burst: u32) -> ApiLimiter {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            Arc::new(RateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            ))
        });
        ApiLimiter { limiter }
    }

    /// `Err(wait)` when `key` is over its budget.
    pub fn check(&self, key: &RateKey) -> Result<(), Duration> {
        let Some(l) = &self.limiter else {
            return Ok(());
        };
        l.check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets clients whose buckets are full again (bounded memory); call now and then.
    pub fn forget_idle(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// Concurrent downloads per client address. Cheap to clone.
#[derive(Clone)]
pub struct DownloadSlots {
    max: usize,
    running: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One running download; frees its slot when dropped (with the response body).
pub struct DownloadSlot {
    client: IpAddr,
    running: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl DownloadSlots {
    /// At most `max` downloads per address.
    pub fn new(max: usize) -> DownloadSlots {
        DownloadSlots {
            max,
            running: Arc::default(),
        }
    }

    /// A slot for `client`, or `None` when it already runs the maximum.
    pub fn acquire(&self, client: IpAddr) -> Option<DownloadSlot> {
        let mut running = crate::lock(&self.running);
        let n = running.entry(client).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(DownloadSlot {
            client,
            running: Arc::clone(&self.running),
        })
    }
}

impl Drop for DownloadSlot {
    fn drop(&mut self) {
        let mut running = crate::lock(&self.running);
        if let Some(n) = running.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_429_for_that_client_only() {
        let l = ApiLimiter::new(1, 3);
        let a = RateKey::Client(IpAddr::from([10, 0, 0, 1]));
        let b = RateKey::Token("t1".into());
        for _ in 0..3 {
            assert!(l.check(&a).is_ok());
        }
        let wait = l.check(&a).unwrap_err();
        assert!(wait <= Duration::from_secs(1));
        assert!(l.check(&b).is_ok());
        let off = ApiLimiter::new(0, 0);
        assert!((0..10_000).all(|_| off.check(&a).is_ok()));
    }

    #[test]
    fn download_slots_per_address_are_freed_on_drop() {
        let slots = DownloadSlots::new(2);
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let one = slots.acquire(a).unwrap();
        let _two = slots.acquire(a).unwrap();
        assert!(slots.acquire(a).is_none());
        assert!(slots.acquire(b).is_some());
        drop(one);
        assert!(slots.acquire(a).is_some());
    }
}
