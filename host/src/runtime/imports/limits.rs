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
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// Tables an instance may have, and elements in each (a Rust guest has one
/// table of a few hundred functions).
pub const MAX_TABLES: usize = 4;
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

/// CPU the guest may use between two durable points (steps, timers,
/// signals, branches, the end), in epoch ticks. Cheap calls (clock and
/// random reads, `input`, `take`) do not start it afresh: a loop of them is
/// a loop. Time spent waiting inside host calls never counts, so a replay
/// or a wake-up never inherits a spent budget.
pub struct CpuBudget {
    used: u64,
    limit: u64,
    /// The run's ticks in all its instances (`--max-run-cpu`).
    run_limit: u64,
}

/// Which CPU limit a tick went past.
pub enum CpuExceeded {
    /// `--max-cpu`: since the last durable point.
    SinceDurablePoint,
    /// `--max-run-cpu`: the whole run.
    Run,
}

impl CpuBudget {
    pub fn new(limit_ticks: u64, run_limit_ticks: u64) -> Self {
        CpuBudget { used: 0, limit: limit_ticks, run_limit: run_limit_ticks }
    }

    /// One more tick of guest CPU, `run_total` ticks in the run so far.
    pub fn tick(&mut self, run_total: u64) -> Result<(), CpuExceeded> {
        self.used += 1;
        if run_total > self.run_limit {
            return Err(CpuExceeded::Run);
        }
        if self.used > self.limit {
            return Err(CpuExceeded::SinceDurablePoint);
        }
        Ok(())
    }

    pub fn reset(&mut self) {
        self.used = 0;
    }

    pub fn limit_ticks(&self) -> u64 {
        self.limit
    }
}
