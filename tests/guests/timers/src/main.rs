//! Test guest for durable timers and retries.
//!
//! - `{"mode":"ctx_sleep","sleep_ms":N}` / `"std_sleep"`: a step, a durable
//!   sleep (`ctx.sleep` or `std::thread::sleep` in workflow code), a step;
//!   returns the wall-clock times (ms) the two steps ran at.
//! - `{"mode":"flaky","fail":K,"log":PATH}`: a step that fails its first K
//!   attempts (an `Err`), logging each attempt to PATH.
//! - `"flaky_panic"`: the same, failing by panicking.
//! - `"flaky_branch"`: a parallel branch whose first K attempts panic.
//! - `"permanent"`: a step whose `Err` is permanent.
//! - `"timeout"`: a step that sleeps 5 s with a 300 ms timeout per attempt.

use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_sdk::{Ctx, Error, RetryPolicy};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Input {
    mode: String,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    fail: u32,
    #[serde(default)]
    log: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn log(input: &Input, line: &str) -> Result<(), Error> {
    if let Some(path) = &input.log {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(format!("{line}\n").as_bytes())?; // one write per line
    }
    Ok(())
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy::default().max_attempts(4).initial_backoff(Duration::from_millis(300)).multiplier(2.0).jitter(0.0)
}

fn main() {
    cairn_sdk::run(workflow)
}

fn workflow(ctx: &mut Ctx, input: Input) -> Result<Value, Error> {
    match input.mode.as_str() {
        "ctx_sleep" | "std_sleep" => {
            let before: u64 = ctx.step("before", |_s| {
                log(&input, "before")?;
                Ok(now_ms())
            })?;
            if input.mode == "ctx_sleep" {
                ctx.sleep(Duration::from_millis(input.sleep_ms))?;
            } else {
                std::thread::sleep(Duration::from_millis(input.sleep_ms));
            }
            let after: u64 = ctx.step("after", |_s| {
                log(&input, "after")?;
                Ok(now_ms())
            })?;
            Ok(json!({ "before": before, "after": after }))
        }
        "flaky" | "flaky_panic" => {
            let attempts: u32 = ctx.step_with("flaky", quick_retries(), |s| {
                log(&input, &format!("attempt {} {}", s.attempt(), now_ms()))?;
                if s.attempt() <= input.fail {
                    if input.mode == "flaky_panic" {
                        panic!("attempt {} panicked", s.attempt());
                    }
                    return Err(Error::new(format!("attempt {} failed", s.attempt())));
                }
                Ok(s.attempt())
            })?;
            Ok(json!({ "succeeded_on_attempt": attempts }))
        }
        "flaky_branch" => {
            // A branch retried like a step: each attempt in a fresh instance.
            let branch = ctx.spawn_with("flaky_branch", quick_retries(), |s| {
                log(&input, &format!("attempt {} {}", s.attempt(), now_ms()))?;
                if s.attempt() <= input.fail {
                    panic!("branch attempt {} panicked", s.attempt());
                }
                Ok(s.attempt())
            })?;
            let other = ctx.spawn("steady", |_s| Ok(0u32))?;
            let (attempts, _): (u32, u32) = ctx.join2(branch, other)?;
            Ok(json!({ "succeeded_on_attempt": attempts }))
        }
        "permanent" => {
            ctx.step_with("decline", quick_retries(), |s| -> Result<(), Error> {
                log(&input, &format!("attempt {}", s.attempt()))?;
                Err(Error::permanent("card declined"))
            })?;
            Ok(Value::Null)
        }
        "timeout" => {
            let policy = quick_retries().max_attempts(2).timeout(Duration::from_millis(300));
            ctx.step_with("slow", policy, |s| {
                log(&input, &format!("attempt {}", s.attempt()))?;
                std::thread::sleep(Duration::from_secs(5));
                Ok(())
            })?;
            Ok(Value::Null)
        }
        other => Err(Error::permanent(format!("unknown mode {other}"))),
    }
}
