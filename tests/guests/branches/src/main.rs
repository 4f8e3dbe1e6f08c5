//! Test guest for parallel branches: a step, `n` branches named "task"
//! (occurrences 1..n) that sleep `sleep_ms * (i + 1)` (or a flat
//! `sleep_ms` with `"flat": true`) and log to a granted file, a join, and
//! a step after it.
//!
//! `{"n":5,"sleep_ms":400,"log":"/data/log.txt","fail":[3],"mode":"join_all"}`
//! `mode`: `join_all` (default), `join2` (n must be 2), `unjoined` (spawns
//! and finishes without joining).

use std::io::Write as _;
use std::time::Duration;

use cairn_sdk::{Ctx, Error, RetryPolicy};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Input {
    n: usize,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    flat: bool,
    #[serde(default)]
    log: Option<String>,
    /// Branches whose closure fails (permanently).
    #[serde(default)]
    fail: Vec<usize>,
    #[serde(default)]
    mode: Option<String>,
}

fn log(input: &Input, line: &str) -> Result<(), Error> {
    if let Some(path) = &input.log {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(format!("{line}\n").as_bytes())?; // one write: lines from parallel branches do not interleave
    }
    Ok(())
}

fn main() {
    cairn_sdk::run(workflow)
}

fn workflow(ctx: &mut Ctx, input: Input) -> Result<Value, Error> {
    let base: u64 = ctx.step("prepare", |_s| Ok(1000))?;
    let mut branches = Vec::new();
    for i in 0..input.n {
        let input = &input;
        let branch = ctx.spawn_with("task", RetryPolicy::no_retries(), move |s| {
            log(input, &format!("start {i} {}", s.idempotency_key()))?;
            let factor = if input.flat { 1 } else { i as u64 + 1 };
            std::thread::sleep(Duration::from_millis(input.sleep_ms * factor));
            if input.fail.contains(&i) {
                return Err(Error::permanent(format!("task {i} failed")));
            }
            log(input, &format!("done {i}"))?;
            Ok(base + i as u64)
        })?;
        branches.push(branch);
    }
    let values: Vec<u64> = match input.mode.as_deref().unwrap_or("join_all") {
        "join2" => {
            let mut it = branches.into_iter();
            let (a, b) = ctx.join2(it.next().unwrap(), it.next().unwrap())?;
            vec![a, b]
        }
        "unjoined" => {
            drop(branches);
            Vec::new()
        }
        _ => ctx.join_all(branches)?,
    };
    let sum: u64 = ctx.step("after", |_s| Ok(values.iter().sum()))?;
    Ok(json!({ "values": values, "sum": sum }))
}
