//! Test guest for non-determinism: its step names come from a file in a
//! granted directory, read by workflow code (files are not journaled).
//! Change the file between a crash and a resume and the replay asks for
//! steps the history does not hold.

use std::io::Write as _;
use std::time::Duration;

use cairn_sdk::{Ctx, Error};
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    names_file: String,
    log: String,
    #[serde(default)]
    step_ms: u64,
}

fn main() {
    cairn_sdk::run(workflow)
}

fn workflow(ctx: &mut Ctx, input: Input) -> Result<Vec<String>, Error> {
    let names = std::fs::read_to_string(&input.names_file)?;
    let mut done = Vec::new();
    for name in names.lines().filter(|l| !l.trim().is_empty()) {
        let name = name.trim();
        let v: String = ctx.step(name, |_s| {
            std::thread::sleep(Duration::from_millis(input.step_ms));
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&input.log)?;
            f.write_all(format!("{name}\n").as_bytes())?;
            Ok(name.to_uppercase())
        })?;
        done.push(v);
    }
    Ok(done)
}
