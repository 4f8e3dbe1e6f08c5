//! What an instance may cost: linear memory (a limiter that fails the
//! growth with a message) and CPU between host calls (counted in epoch
//! ticks).

/// Memory limit enforcement with a message the user can act on.
pub struct MemoryLimiter {
    max_bytes: usize,
    hit: Option<String>,
}

impl MemoryLimiter {
    pub fn new(max_bytes: usize) -> Self {
        MemoryLimiter { max_bytes, hit: None }
    }

    /// The message of the limit the guest ran into, if it did.
    pub fn take_hit(&mut self) -> Option<String> {
        self.hit.take()
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            let msg = format!(
                "memory limit: the workflow asked for {} MiB of memory, more than --max-memory {} MiB",
                desired.div_ceil(1 << 20),
                self.max_bytes >> 20
            );
            self.hit = Some(msg.clone());
            return Err(wasmtime::Error::msg(msg));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// CPU the guest may use between two host calls, in epoch ticks. Time
/// spent waiting inside host calls never counts, so a replay or a wake-up
/// never inherits a spent budget.
pub struct CpuBudget {
    used: u64,
    limit: u64,
}

impl CpuBudget {
    pub fn new(limit_ticks: u64) -> Self {
        CpuBudget { used: 0, limit: limit_ticks }
    }

    /// One more tick of guest CPU; false once over the budget.
    pub fn tick(&mut self) -> bool {
        self.used += 1;
        self.used <= self.limit
    }

    pub fn reset(&mut self) {
        self.used = 0;
    }

    pub fn limit_ticks(&self) -> u64 {
        self.limit
    }
}
