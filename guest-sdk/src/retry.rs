use std::time::Duration;

/// How a step is retried when an attempt fails.
///
/// Defaults (also what plain [`Ctx::step`](crate::Ctx::step) uses):
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

    /// The ABI's 48-byte form (`docs/abi.md`).
    pub(crate) fn encode(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0..4].copy_from_slice(&self.max_attempts.max(1).to_le_bytes());
        b[4..8].copy_from_slice(&(self.timeout.is_some() as u32).to_le_bytes());
        b[8..16].copy_from_slice(&(self.initial_backoff.as_millis() as u64).to_le_bytes());
        b[16..24].copy_from_slice(&(self.max_backoff.as_millis() as u64).to_le_bytes());
        b[24..32].copy_from_slice(&self.multiplier.to_le_bytes());
        b[32..40].copy_from_slice(&self.jitter.to_le_bytes());
        b[40..48].copy_from_slice(&(self.timeout.unwrap_or_default().as_millis() as u64).to_le_bytes());
        b
    }
}
