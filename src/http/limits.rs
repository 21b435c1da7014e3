//! Abuse limits on the API: a token bucket per client address (X-Forwarded-For believed only
//! from `--trusted-proxies`) for every `/api/` request. A client over its budget gets 429
//! `rate_limited` with `Retry-After`; other clients are unaffected. Downloads (`/files/`,
//! `/dl/`) are not counted: docks behind one carrier NAT share an address. The defaults
//! (burst 1,000, then 200 per second) never throttle a fleet rollout or the benchmarks.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Per-client limiter of API requests. Cheap to clone.
#[derive(Clone)]
pub struct ApiLimiter {
    limiter: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
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

    /// `Err(wait)` when `client` is over its budget.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        let Some(l) = &self.limiter else {
            return Ok(());
        };
        l.check_key(&client)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_429_for_that_client_only() {
        let l = ApiLimiter::new(1, 3);
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        for _ in 0..3 {
            assert!(l.check(a).is_ok());
        }
        let wait = l.check(a).unwrap_err();
        assert!(wait <= Duration::from_secs(1));
        assert!(l.check(b).is_ok());
        let off = ApiLimiter::new(0, 0);
        assert!((0..10_000).all(|_| off.check(a).is_ok()));
    }
}
