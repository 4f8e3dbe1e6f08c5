//! Test guest that misbehaves on request, to check that the sandbox limits
//! and failure paths hold: `{"mode": "..."}` with one of
//! `loop`, `loop_in_step`, `alloc`, `alloc_in_step`, `panic_in_step`,
//! `panic`, `err`, `step_err`, `exit`, `sandbox` (reports what the sandbox
//! lets it see), `ok`.

use cairn_sdk::{Ctx, Error, RetryPolicy};
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    mode: String,
}

fn main() {
    cairn_sdk::run(workflow)
}

fn spin() -> ! {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

fn hog() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1u8; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

/// Limits and panics are retried like any failure; these checks want the
/// first failure to be the last.
fn once() -> RetryPolicy {
    RetryPolicy::no_retries()
}

fn workflow(ctx: &mut Ctx, input: Input) -> Result<String, Error> {
    let before: u32 = ctx.step("before", |_s| Ok(1))?;
    match input.mode.as_str() {
        "loop" => spin(),
        "loop_in_step" => ctx.step_with("spin", once(), |_s| -> Result<(), Error> { spin() })?,
        "alloc" => hog(),
        "alloc_in_step" => ctx.step_with("hog", once(), |_s| -> Result<(), Error> { hog() })?,
        "panic" => panic!("boom outside a step"),
        "panic_in_step" => ctx.step_with("explode", once(), |_s| -> Result<(), Error> { panic!("boom in a step") })?,
        "err" => return Err(Error::new("the workflow gave up")),
        "step_err" => ctx.step("decline", |_s| -> Result<(), Error> { Err(Error::permanent("card declined")) })?,
        "exit" => std::process::exit(3),
        "sandbox" => {
            let env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
            let args: Vec<String> = std::env::args().collect();
            let mut stdin = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut stdin);
            let report = serde_json::json!({
                "env": env,
                "args": args,
                "etc_passwd": std::fs::read_to_string("/etc/passwd").is_ok(),
                "root_dir": std::fs::read_dir("/").is_ok(),
                "stdin": stdin,
            });
            return Ok(report.to_string());
        }
        _ => {}
    }
    let after: u32 = ctx.step("after", |_s| Ok(before + 1))?;
    Ok(format!("survived with {after}"))
}
