//! `make torture [KILLS=1000] [SEED=...]`: the kill -9 campaign, long form.
//! Prints what it found; exits 1 if a committed step ran again or a step
//! was lost.

fn main() {
    let arg = |name: &str, default: u64| -> u64 {
        let mut args = std::env::args().skip_while(|a| a != name);
        args.nth(1).and_then(|v| v.parse().ok()).unwrap_or(default)
    };
    let kills = arg("--kills", 1000) as usize;
    let seed = arg("--seed", 0x5eed_c0ff_ee00_1234);
    let report = cairn_e2e::torture::campaign(kills, seed);
    println!(
        "torture: {} kills over {} workflows in {:.0} s (seed {seed:#x}): {} committed steps re-run, {} lost, {} problems",
        report.kills,
        report.workflows,
        report.elapsed.as_secs_f64(),
        report.reran,
        report.lost,
        report.problems.len()
    );
    if report.reran > 0 || report.lost > 0 || !report.problems.is_empty() {
        std::process::exit(1);
    }
}
