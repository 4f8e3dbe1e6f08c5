//! The benchmark workflow (`make bench`), one mode per workload:
//!
//! - `{"mode":"steps","n":1000}`: n sequential steps, each returning about
//!   100 bytes of JSON.
//! - `{"mode":"steps","n":1000,"log":"/data/log.txt"}`: the same, each step
//!   appending its index and the wall-clock time (ns) to a log (the
//!   kill-and-resume workload).
//! - `{"mode":"branches","n":100,"sleep_ms":1000}`: n branches that wait, joined.
//! - `{"mode":"park","sleep_ms":3600000}`: a step, a long durable sleep, a step.
//! - `{"mode":"tiny"}`: one step.
//! - `{"mode":"paced","n":500,"sleep_ms":10}`: n steps, each sleeping
//!   first (a run committing about 1000/sleep_ms steps per second).
//! - `{"mode":"kv_steps","n":1000}`: the `steps` workload, each step also
//!   putting its record in the key-value store (64 keys, in turn).

use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_sdk::{Ctx, Error};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Input {
    mode: String,
    #[serde(default)]
    n: u32,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    log: Option<String>,
}

/// About 100 bytes as JSON.
#[derive(Serialize, Deserialize)]
struct Record {
    index: u32,
    account: String,
    amount_cents: u64,
    currency: String,
    note: String,
}

fn main() {
    cairn_sdk::run(workflow)
}

fn workflow(ctx: &mut Ctx, input: Input) -> Result<u64, Error> {
    match input.mode.as_str() {
        "steps" => {
            let mut total = 0;
            for i in 0..input.n {
                let r: Record = ctx.step("record", |_s| {
                    if let Some(path) = &input.log {
                        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                        let at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
                        f.write_all(format!("{i} {at}\n").as_bytes())?;
                    }
                    Ok(Record {
                        index: i,
                        account: "acct_0123456789abcdef".into(),
                        amount_cents: 1000 + i as u64,
                        currency: "EUR".into(),
                        note: "benchmark step payload".into(),
                    })
                })?;
                total += r.amount_cents;
            }
            Ok(total)
        }
        "kv_steps" => {
            let mut total = 0;
            for i in 0..input.n {
                let r: Record = ctx.step("record", |s| {
                    let r = Record {
                        index: i,
                        account: "acct_0123456789abcdef".into(),
                        amount_cents: 1000 + i as u64,
                        currency: "EUR".into(),
                        note: "benchmark step payload".into(),
                    };
                    s.kv().put(&format!("record/{}", i % 64), &r)?;
                    Ok(r)
                })?;
                total += r.amount_cents;
            }
            Ok(total)
        }
        "branches" => {
            let mut branches = Vec::new();
            for i in 0..input.n {
                let wait = Duration::from_millis(input.sleep_ms);
                branches.push(ctx.spawn("wait", move |_s| {
                    std::thread::sleep(wait);
                    Ok(i as u64)
                })?);
            }
            Ok(ctx.join_all(branches)?.into_iter().sum())
        }
        "park" => {
            let a: u64 = ctx.step("before", |_s| Ok(1))?;
            ctx.sleep(Duration::from_millis(input.sleep_ms))?;
            let b: u64 = ctx.step("after", |_s| Ok(2))?;
            Ok(a + b)
        }
        "tiny" => ctx.step("only", |_s| Ok(42)),
        "paced" => {
            let pause = Duration::from_millis(input.sleep_ms);
            let mut total = 0;
            for i in 0..input.n {
                total += ctx.step("paced", |_s| {
                    std::thread::sleep(pause);
                    Ok(i as u64)
                })?;
            }
            Ok(total)
        }
        other => Err(Error::permanent(format!("unknown mode {other}"))),
    }
}
