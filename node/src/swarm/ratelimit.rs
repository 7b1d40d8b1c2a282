//! Bandwidth caps: a token bucket that says how long to wait before bytes may move.
//!
//! Pure: the caller passes `now`, so the rule is tested without clocks; the node wraps it in
//! [`RateLimiter`] which sleeps. Owns: the accounting. Does not own: which bytes are counted
//! (the node counts chunk payloads it sends and receives).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes a bucket may hold: a short burst, so a cap holds over any second while small
/// transfers still start at once.
const BURST_SECONDS: f64 = 0.25;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket refilling at `rate` bytes per second (must be > 0), starting full.
    pub fn new(rate: u64, now: Instant) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (rate * BURST_SECONDS).max(64.0 * 1024.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// How long until the balance is back to zero, reserving nothing: a sender that decides
    /// what to send only when it may send (the seed) waits this first, then [`Self::reserve`]s.
    pub fn until_ready(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Reserves `bytes` and says how long the caller must wait before sending them. The
    /// balance may go negative, so later callers queue behind earlier ones in order.
    pub fn reserve(&mut self, bytes: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A [`TokenBucket`] shared by a node's transfers in one direction.
#[derive(Debug)]
pub struct RateLimiter {
    bucket: Mutex<TokenBucket>,
}

impl RateLimiter {
    /// `None` for a rate of 0, which means unlimited.
    pub fn new(rate: u64) -> Option<RateLimiter> {
        (rate > 0).then(|| RateLimiter {
            bucket: Mutex::new(TokenBucket::new(rate, Instant::now())),
        })
    }

    /// Waits until the bucket is out of debt, reserving nothing.
    pub async fn ready(&self) {
        let wait = self
            .bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .until_ready(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes `bytes` from the bucket without waiting: whoever comes next waits for them.
    pub fn charge(&self, bytes: u64) {
        let _ = self
            .bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reserve(bytes, Instant::now());
    }

    /// Waits until `bytes` may move.
    pub async fn acquire(&self, bytes: u64) {
        let wait = self
            .bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_run_rate_is_the_cap() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1_000_000, start);
        // Send 10 MB in 64 KiB pieces as fast as the bucket allows: the last piece may go only
        // after (10 MB - burst) / rate seconds.
        let mut at = start;
        let mut sent = 0u64;
        while sent < 10_000_000 {
            at += bucket.reserve(65_536, at);
            sent += 65_536;
        }
        let seconds = (at - start).as_secs_f64();
        let expected = (sent as f64 - 250_000.0) / 1_000_000.0;
        assert!((seconds - expected).abs() < 0.01, "{seconds} vs {expected}");
    }

    #[test]
    fn a_burst_goes_at_once_and_idle_time_refills_only_to_the_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1_000_000, start);
        assert_eq!(bucket.reserve(200_000, start), Duration::ZERO);
        // An hour idle does not bank an hour of bytes.
        let later = start + Duration::from_secs(3600);
        assert_eq!(bucket.reserve(250_000, later), Duration::ZERO);
        assert!(bucket.reserve(100_000, later) > Duration::from_millis(90));
        assert!(RateLimiter::new(0).is_none());
    }

    #[test]
    fn until_ready_waits_out_the_debt_and_reserves_nothing() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1_000_000, start);
        assert_eq!(bucket.until_ready(start), Duration::ZERO);
        // 250 kB of burst, then 500 kB of debt: half a second until the next sender may go.
        bucket.reserve(750_000, start);
        assert_eq!(bucket.until_ready(start), Duration::from_millis(500));
        // Asking again does not deepen the debt.
        assert_eq!(bucket.until_ready(start), Duration::from_millis(500));
        let later = start + Duration::from_millis(500);
        assert_eq!(bucket.until_ready(later), Duration::ZERO);
        assert!(bucket.reserve(100_000, later) > Duration::from_millis(90));
    }
}
