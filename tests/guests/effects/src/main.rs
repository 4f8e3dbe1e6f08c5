//! Effects under test: HTTP from steps, key-value state, compensations and
//! cancellation with a grace period. The input's `mode` picks the workflow.

use std::time::Duration;

use cairn_sdk::{Ctx, Error, RetryPolicy};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
enum Input {
    /// One charge over HTTP, then a live pause inside the step (a window
    /// for a kill after the service answered, before the step commits),
    /// unless the service says it replayed a stored answer.
    Charge {
        url: String,
        amount_cents: u64,
        #[serde(default)]
        pause_ms: u64,
    },
    /// GET a URL in a step: its status and body length, or the step's error.
    Fetch { url: String },
    /// An HTTP request between steps, through a Step kept from a closure.
    FetchOutside { url: String },
    /// `times` steps, each adding 1 to `key` (read, then write), pausing
    /// after the write inside the step.
    Incr {
        key: String,
        times: u32,
        #[serde(default)]
        pause_ms: u64,
    },
    /// A step that writes `key`, then panics (`panic`) or fails for good.
    WriteThenFail { key: String, panic: bool },
    /// Three steps with compensations; the third fails for good, and the
    /// undos (each appending its name to the KV list `undone`, then
    /// pausing) run in reverse.
    Saga {
        #[serde(default)]
        pause_ms: u64,
    },
    /// Reserve (with an undo), then wait for the signal `go`; a cancellation
    /// compensates and ends the run.
    Reserve,
    /// As `reserve`, but a cancellation is cleaned up by a branch (which
    /// replays the delivered cancellation before its spawn).
    ReserveBranchCleanup,
}

fn main() {
    cairn_sdk::run(workflow)
}

fn pause(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn append(s: &cairn_sdk::Step, list: &str, item: &str) -> Result<(), Error> {
    let kv = s.kv();
    let mut items: Vec<String> = kv.get(list)?.unwrap_or_default();
    items.push(item.to_string());
    kv.put(list, &items)
}

fn workflow(ctx: &mut Ctx, input: Input) -> Result<Value, Error> {
    match input {
        Input::Charge { url, amount_cents, pause_ms } => {
            let charge: Value = ctx.step("charge", |s| {
                let response =
                    s.http().post(format!("{url}/charges")).json(&json!({"amount_cents": amount_cents})).send()?;
                if response.status() != 201 {
                    return Err(Error::permanent(format!("charge refused: {}", response.status())));
                }
                let charge: Value = response.json()?;
                let replayed = response.header("Idempotent-Replayed").is_some();
                if !replayed {
                    pause(pause_ms);
                }
                Ok(json!({"charge": charge, "key": s.idempotency_key(), "replayed": replayed}))
            })?;
            Ok(charge)
        }
        Input::Fetch { url } => ctx.step_with(
            "fetch",
            RetryPolicy::default().max_attempts(2).initial_backoff(Duration::from_millis(10)),
            |s| {
                let r = s.http().get(url.as_str()).timeout(Duration::from_secs(10)).send()?;
                Ok(json!({"status": r.status(), "len": r.body().len()}))
            },
        ),
        Input::FetchOutside { url } => {
            let mut outside = None;
            let _: u32 = ctx.step("smuggle", |s| {
                outside = Some(s.clone());
                Ok(1)
            })?;
            match outside {
                // Replayed: the closure did not run; nothing to smuggle.
                None => Err(Error::new("replayed")),
                Some(s) => match s.http().get(url).send() {
                    Ok(_) => Ok(json!("sent")),
                    Err(e) => Err(Error::new(format!("permanent={} {}", e.is_permanent(), e.message()))),
                },
            }
        }
        Input::Incr { key, times, pause_ms } => {
            for _ in 0..times {
                ctx.step("incr", |s| {
                    let kv = s.kv();
                    let n: u64 = kv.get(&key)?.unwrap_or(0);
                    kv.put(&key, &(n + 1))?;
                    pause(pause_ms);
                    Ok(n + 1)
                })?;
            }
            Ok(json!("done"))
        }
        Input::WriteThenFail { key, panic } => {
            ctx.step_with("write_then_fail", RetryPolicy::default().max_attempts(1), |s| -> Result<(), Error> {
                s.kv().put(&key, &1)?;
                if panic {
                    panic!("crashed after the write");
                }
                Err(Error::permanent("failed for good after the write"))
            })?;
            Ok(json!("unreachable"))
        }
        Input::Saga { pause_ms } => {
            for name in ["book_flight", "book_hotel"] {
                ctx.step_with_compensation(
                    name,
                    |_s| Ok(format!("{name}-ok")),
                    move |s, booked: String| {
                        append(s, "undone", &format!("undo {booked}"))?;
                        pause(pause_ms);
                        Ok(())
                    },
                )?;
            }
            let failed = ctx.step("book_car", |_s| -> Result<String, Error> { Err(Error::permanent("no cars left")) });
            match failed {
                Ok(_) => Ok(json!("booked")),
                Err(e) => {
                    ctx.compensate()?;
                    Err(e)
                }
            }
        }
        Input::ReserveBranchCleanup => {
            ctx.step("reserve", |s| {
                s.kv().put("reserved", &true)?;
                Ok(())
            })?;
            match ctx.wait_signal::<Value>("go") {
                Ok(v) => Ok(v),
                Err(e) if e.is_cancelled() => {
                    let cleanup = ctx.spawn("release", |s| {
                        s.kv().put("reserved", &false)?;
                        append(s, "released", "by a branch")
                    })?;
                    ctx.join_all(vec![cleanup])?;
                    Err(e)
                }
                Err(e) => Err(e),
            }
        }
        Input::Reserve => {
            ctx.step_with_compensation(
                "reserve",
                |s| {
                    s.kv().put("reserved", &true)?;
                    Ok("R-1".to_string())
                },
                |s, reservation: String| {
                    s.kv().put("reserved", &false)?;
                    append(s, "released", &reservation)
                },
            )?;
            match ctx.wait_signal::<Value>("go") {
                Ok(v) => Ok(v),
                Err(e) if e.is_cancelled() => {
                    ctx.compensate()?;
                    Err(e)
                }
                Err(e) => Err(e),
            }
        }
    }
}
