//! Test guest for crash-and-replay: many steps, each appending its index
//! and idempotency key to a log in a granted directory after a little CPU
//! work; workflow code between steps reads the clock and randomness, and
//! logs what it read through a step, so a test can compare the values seen
//! before a kill with the ones replayed after it.

use std::collections::HashMap;
use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_sdk::{Ctx, Error};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Input {
    steps: u32,
    #[serde(default)]
    work_ms: u64,
    log: String,
    #[serde(default = "ten")]
    observe_every: u32,
}

fn ten() -> u32 {
    10
}

#[derive(Serialize)]
struct Output {
    sum: u64,
    /// (step index, wall-clock nanos, random u64, monotonic nanos) read by workflow code.
    observed: Vec<(u32, u64, u64, u64)>,
    keys: HashMap<u32, String>,
}

fn append(path: &str, line: &str) -> Result<(), Error> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(format!("{line}\n").as_bytes())?;
    Ok(())
}

fn busy(ms: u64) {
    let until = Instant::now() + Duration::from_millis(ms);
    let mut x = 0u64;
    while Instant::now() < until {
        for i in 0..1000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
    }
}

fn main() {
    cairn_sdk::run(workflow)
}

fn workflow(ctx: &mut Ctx, input: Input) -> Result<Output, Error> {
    let started = Instant::now();
    let mut out = Output { sum: 0, observed: Vec::new(), keys: HashMap::new() };
    for i in 0..input.steps {
        if i % input.observe_every.max(1) == 0 {
            let wall = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).map_err(Error::from_display)?;
            let random = u64::from_le_bytes(bytes);
            let mono = started.elapsed().as_nanos() as u64;
            ctx.step("observe", |_s| append(&input.log, &format!("obs {i} {wall} {random} {mono}")))?;
            out.observed.push((i, wall, random, mono));
        }
        println!("before step {i}");
        let (value, key): (u64, String) = ctx.step("work", |s| {
            busy(input.work_ms);
            append(&input.log, &format!("step {i} {}", s.idempotency_key()))?;
            Ok((i as u64 * i as u64, s.idempotency_key().to_string()))
        })?;
        out.sum += value;
        out.keys.insert(i, key);
    }
    Ok(out)
}
