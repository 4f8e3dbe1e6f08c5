//! Test guest for signals: waits for the signals named in its input, in
//! order, each with an optional timeout, with a step before each wait (its
//! closure logs to a granted file so tests can see progress), and returns
//! what it received.
//!
//! `{"waits":[{"name":"approve"},{"name":"note","timeout_ms":500}],"log":"/data/log.txt"}`

use std::io::Write as _;
use std::time::Duration;

use cairn_sdk::{Ctx, Error};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Wait {
    name: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
struct Input {
    waits: Vec<Wait>,
    #[serde(default)]
    log: Option<String>,
}

fn main() {
    cairn_sdk::run(workflow)
}

fn workflow(ctx: &mut Ctx, input: Input) -> Result<Vec<Value>, Error> {
    let mut got = Vec::new();
    for (i, wait) in input.waits.iter().enumerate() {
        ctx.step("about_to_wait", |_s| {
            if let Some(path) = &input.log {
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                f.write_all(format!("waiting {i} {}\n", wait.name).as_bytes())?;
            }
            Ok(())
        })?;
        let value = match wait.timeout_ms {
            None => ctx.wait_signal::<Value>(&wait.name)?,
            Some(ms) => ctx
                .wait_signal_timeout::<Value>(&wait.name, Duration::from_millis(ms))?
                .unwrap_or_else(|| Value::String("timed out".into())),
        };
        got.push(value);
    }
    Ok(got)
}
