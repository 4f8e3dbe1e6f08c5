//! Retry policies, as the guest passes them with each step (see
//! `docs/abi.md`), and the backoff they prescribe.

use std::time::Duration;

/// Size of a policy in the ABI's binary form.
pub const POLICY_BYTES: usize = 48;

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub multiplier: f64,
    pub max_backoff: Duration,
    /// Fraction of the delay randomly added or removed (0.1 = ±10%).
    pub jitter: f64,
    /// Limit per attempt.
    pub timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    /// Must match `cairn_sdk::RetryPolicy::default()`; used when a guest
    /// passes no policy.
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
    /// Decode the 48-byte little-endian form: max_attempts u32, flags u32
    /// (bit 0: has timeout), initial_backoff_ms u64, max_backoff_ms u64,
    /// multiplier f64, jitter f64, timeout_ms u64.
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

    fn encode(p: &RetryPolicy) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(p.max_attempts.to_le_bytes());
        b.extend((p.timeout.is_some() as u32).to_le_bytes());
        b.extend((p.initial_backoff.as_millis() as u64).to_le_bytes());
        b.extend((p.max_backoff.as_millis() as u64).to_le_bytes());
        b.extend(p.multiplier.to_le_bytes());
        b.extend(p.jitter.to_le_bytes());
        b.extend((p.timeout.unwrap_or_default().as_millis() as u64).to_le_bytes());
        b
    }

    #[test]
    fn round_trips_and_grows_to_the_cap() {
        let p = RetryPolicy { timeout: Some(Duration::from_millis(1500)), ..RetryPolicy::default() };
        assert_eq!(RetryPolicy::decode(&encode(&p)).unwrap(), p);
        assert_eq!(RetryPolicy::decode(&[]).unwrap(), RetryPolicy::default());
        let delays: Vec<u64> = (1..=8).map(|a| p.base_delay(a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.delay(1, 0.0).as_millis(), 900);
        assert_eq!(p.delay(1, 0.5).as_millis(), 1000);
        assert!(RetryPolicy::decode(&[0; 10]).is_err());
    }
}
