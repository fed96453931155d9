//! Per-client-address budgets for expensive or abusable work done before a caller is known: an
//! argon2 check of a password, a lookup of a GitHub token. Each address has a bucket of
//! attempts (a burst, refilled at a steady rate) and a cap on attempts in flight; an attempt
//! takes one from the bucket and gives it back if it succeeds, so only failures use it up.
//!
//! A flood from one address then costs a few checks, not one per request, and callers from
//! other addresses keep their turn.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How an address's budget is set.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Attempts an address may fail in a row before it must wait.
    pub burst: u32,
    /// One failed attempt is forgiven per this much time.
    pub refill_every: Duration,
    /// Attempts of one address running at once.
    pub in_flight: u32,
}

/// Too many attempts from this address: try again after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds, at least 1, for a `Retry-After` header.
    pub fn seconds(self) -> u64 {
        self.0.as_secs_f64().ceil().max(1.0) as u64
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    in_flight: u32,
}

/// Addresses remembered at most; past this, full buckets with nothing in flight are forgotten.
const MAX_ADDRESSES: usize = 100_000;

#[derive(Clone)]
pub struct Throttle {
    budget: Budget,
    buckets: Arc<Mutex<HashMap<IpAddr, Bucket>>>,
}

/// One attempt in flight: dropped without [`Attempt::succeeded`], it counts as failed.
pub struct Attempt {
    throttle: Throttle,
    /// `None`: an attempt of a caller whose address is not known, which nothing limits.
    address: Option<IpAddr>,
    refund: bool,
}

impl Throttle {
    pub fn new(budget: Budget) -> Self {
        Self { budget, buckets: Arc::default() }
    }

    /// An attempt of a caller at `address` (unlimited when the address is not known: a router
    /// called without a connection, as in-process tests do).
    pub fn begin(&self, address: Option<IpAddr>) -> Result<Attempt, RetryAfter> {
        match address {
            Some(address) => self.begin_at(address, Instant::now()),
            None => Ok(Attempt { throttle: self.clone(), address: None, refund: false }),
        }
    }

    fn begin_at(&self, address: IpAddr, now: Instant) -> Result<Attempt, RetryAfter> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_ADDRESSES {
            let budget = self.budget;
            buckets
                .retain(|_, bucket| bucket.in_flight > 0 || refilled(bucket, &budget, now) < f64::from(budget.burst));
        }
        let budget = self.budget;
        let bucket =
            buckets.entry(address).or_insert(Bucket { tokens: f64::from(budget.burst), updated: now, in_flight: 0 });
        bucket.tokens = refilled(bucket, &budget, now);
        bucket.updated = now;
        if bucket.in_flight >= budget.in_flight {
            return Err(RetryAfter(Duration::from_secs(1)));
        }
        if bucket.tokens < 1.0 {
            return Err(RetryAfter(budget.refill_every.mul_f64(1.0 - bucket.tokens)));
        }
        bucket.tokens -= 1.0;
        bucket.in_flight += 1;
        Ok(Attempt { throttle: self.clone(), address: Some(address), refund: false })
    }
}

fn refilled(bucket: &Bucket, budget: &Budget, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    let rate = 1.0 / budget.refill_every.as_secs_f64().max(f64::EPSILON);
    (bucket.tokens + elapsed * rate).min(f64::from(budget.burst))
}

impl Attempt {
    /// The attempt was good: it costs the address nothing.
    pub fn succeeded(mut self) {
        self.refund = true;
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let Some(address) = self.address else { return };
        let mut buckets = self.throttle.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = buckets.get_mut(&address) {
            bucket.in_flight = bucket.in_flight.saturating_sub(1);
            if self.refund {
                bucket.tokens = (bucket.tokens + 1.0).min(f64::from(self.throttle.budget.burst));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget { burst: 3, refill_every: Duration::from_secs(10), in_flight: 2 };

    fn address(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn an_address_may_fail_its_burst_then_waits_for_the_refill() {
        let throttle = Throttle::new(BUDGET);
        let now = Instant::now();
        for _ in 0..3 {
            drop(throttle.begin_at(address(2), now).unwrap());
        }
        let wait = throttle.begin_at(address(2), now).err().unwrap();
        assert_eq!(wait, RetryAfter(Duration::from_secs(10)));
        assert_eq!(wait.seconds(), 10);
        assert!(throttle.begin_at(address(1), now).is_ok(), "other addresses keep their budget");
        assert!(throttle.begin_at(address(2), now + Duration::from_secs(10)).is_ok(), "one forgiven per refill");
    }

    #[test]
    fn successful_attempts_cost_nothing() {
        let throttle = Throttle::new(BUDGET);
        let now = Instant::now();
        for _ in 0..20 {
            throttle.begin_at(address(1), now).unwrap().succeeded();
        }
        assert!(throttle.begin_at(address(1), now).is_ok());
    }

    #[test]
    fn no_more_than_in_flight_attempts_of_one_address_run_at_once() {
        let throttle = Throttle::new(Budget { burst: 100, ..BUDGET });
        let now = Instant::now();
        let first = throttle.begin_at(address(2), now).unwrap();
        let _second = throttle.begin_at(address(2), now).unwrap();
        assert_eq!(throttle.begin_at(address(2), now).err(), Some(RetryAfter(Duration::from_secs(1))));
        drop(first);
        assert!(throttle.begin_at(address(2), now).is_ok());
    }
}
