//! Retry policies: how a step is retried, the 48-byte form the guest passes
//! with each step (`docs/abi.md`), and the backoff they prescribe.

use std::time::Duration;

/// Size of a policy in the ABI's binary form.
pub const POLICY_BYTES: usize = 48;

/// How a step is retried when an attempt fails.
///
/// Defaults (also what plain `cairn_sdk::Ctx::step` uses):
///
/// | field | default |
/// |---|---|
/// | `max_attempts` | 3 (the first attempt and two retries) |
/// | `initial_backoff` | 1 s |
/// | `multiplier` | 2.0 (1 s, 2 s, 4 s, ...) |
/// | `max_backoff` | 60 s |
/// | `jitter` | 0.1 (each delay randomly within ±10%) |
/// | `timeout` | none (an attempt may run until the CPU limit) |
///
/// An attempt cut short by a host crash is not counted: it leaves no record
/// (recording attempt starts would cost a second fsync on every step), and
/// it runs again, as the same attempt, on resume.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, including the first; 1 means no retries.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_backoff: Duration,
    /// Each further delay is the previous one times this (at least 1).
    pub multiplier: f64,
    /// Delays never exceed this (before jitter).
    pub max_backoff: Duration,
    /// Fraction of each delay randomly added or removed, 0 to 1.
    pub jitter: f64,
    /// Limit on one attempt's duration; an attempt that exceeds it fails
    /// (and is retried like any failure).
    pub timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(60),
            jitter: 0.1,
            timeout: None,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retries.
    pub fn no_retries() -> Self {
        RetryPolicy { max_attempts: 1, ..RetryPolicy::default() }
    }

    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    pub fn initial_backoff(mut self, d: Duration) -> Self {
        self.initial_backoff = d;
        self
    }

    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = m;
        self
    }

    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// The ABI's 48-byte little-endian form: max_attempts u32, flags u32
    /// (bit 0: has timeout), initial_backoff_ms u64, max_backoff_ms u64,
    /// multiplier f64, jitter f64, timeout_ms u64.
    pub fn encode(&self) -> [u8; POLICY_BYTES] {
        let mut b = [0u8; POLICY_BYTES];
        b[0..4].copy_from_slice(&self.max_attempts.max(1).to_le_bytes());
        b[4..8].copy_from_slice(&(self.timeout.is_some() as u32).to_le_bytes());
        b[8..16].copy_from_slice(&(self.initial_backoff.as_millis() as u64).to_le_bytes());
        b[16..24].copy_from_slice(&(self.max_backoff.as_millis() as u64).to_le_bytes());
        b[24..32].copy_from_slice(&self.multiplier.to_le_bytes());
        b[32..40].copy_from_slice(&self.jitter.to_le_bytes());
        b[40..48].copy_from_slice(&(self.timeout.unwrap_or_default().as_millis() as u64).to_le_bytes());
        b
    }

    /// Decode the form [`RetryPolicy::encode`] writes (no bytes: the
    /// default policy), checking multiplier and jitter.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.is_empty() {
            return Ok(RetryPolicy::default());
        }
        let b: &[u8; POLICY_BYTES] =
            bytes.try_into().map_err(|_| format!("a retry policy is {POLICY_BYTES} bytes, got {}", bytes.len()))?;
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let f64_at = |i: usize| f64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let policy = RetryPolicy {
            max_attempts: u32_at(0).max(1),
            initial_backoff: Duration::from_millis(u64_at(8)),
            max_backoff: Duration::from_millis(u64_at(16)),
            multiplier: f64_at(24),
            jitter: f64_at(32),
            timeout: (u32_at(4) & 1 == 1).then(|| Duration::from_millis(u64_at(40))),
        };
        if !(policy.multiplier.is_finite() && policy.multiplier >= 1.0) {
            return Err(format!("retry multiplier {} must be at least 1", policy.multiplier));
        }
        if !(0.0..=1.0).contains(&policy.jitter) {
            return Err(format!("retry jitter {} must be between 0 and 1", policy.jitter));
        }
        Ok(policy)
    }

    /// The delay after failed attempt `attempt` (1-based), before jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = self.multiplier.powi(attempt.saturating_sub(1).min(1000) as i32);
        let ms = (self.initial_backoff.as_millis() as f64 * exp).min(self.max_backoff.as_millis() as f64);
        Duration::from_millis(ms as u64)
    }

    /// The delay after failed attempt `attempt`, with jitter drawn from
    /// `unit` (uniform in [0, 1)). The caller journals the resulting retry
    /// time, so replay never draws again.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base_delay(attempt).as_millis() as f64;
        let factor = 1.0 + self.jitter * (2.0 * unit - 1.0);
        Duration::from_millis((base * factor).max(0.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_grows_to_the_cap() {
        let p = RetryPolicy { timeout: Some(Duration::from_millis(1500)), ..RetryPolicy::default() };
        assert_eq!(RetryPolicy::decode(&p.encode()).unwrap(), p);
        assert_eq!(RetryPolicy::decode(&[]).unwrap(), RetryPolicy::default());
        let delays: Vec<u64> = (1..=8).map(|a| p.base_delay(a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.delay(1, 0.0).as_millis(), 900);
        assert_eq!(p.delay(1, 0.5).as_millis(), 1000);
        assert!(RetryPolicy::decode(&[0; 10]).is_err());
    }
}
