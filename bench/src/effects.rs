//! W11: steps that each do one key-value put, against the same steps
//! without, in interleaved pairs (the disk's fsync rate drifts within
//! seconds): one run of sequential steps, and many runs at once.

use anyhow::Result;
use cairn::model::RunStatus;
use cairn::store::Durability;
use serde_json::json;

use super::{Bench, Row, median, process_cpu};

pub async fn w11(b: &mut Bench) -> Result<Vec<Row>> {
    let s = b.sizes;
    let mut rows = Vec::new();

    // One run, sequential steps: the put rides in the step's own commit.
    let (mut plain, mut kv, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..s.reps.max(5) {
        // Alternate which goes first: a drift of the disk favours neither.
        let order = if rep % 2 == 0 { ["steps", "kv_steps"] } else { ["kv_steps", "steps"] };
        let mut rate = [0.0; 2];
        for mode in order {
            rate[usize::from(mode == "kv_steps")] = burst(b, mode, 1, s.w11_steps, RunStatus::Running).await?.0;
        }
        let [p, k] = rate;
        plain.push(p);
        kv.push(k);
        ratios.push(p / k);
    }
    rows.push(Row {
        id: "W11",
        workload: format!("1 run x {} sequential steps, each putting one key (--durability power)", s.w11_steps),
        value: median(kv),
        unit: "steps/s",
        baseline: Some((median(plain), "steps/s, the same steps without a put")),
        ratio: Some(median(ratios.clone())),
        target: "time per step <= 1.10 x a plain step".into(),
        extra: json!({ "time_ratio_pairs": ratios }),
    });

    // Many runs at once: throughput and CPU per put.
    let (mut plain, mut kv, mut cpu_per_put) = (Vec::new(), Vec::new(), Vec::new());
    let steps = 10u32;
    let runs_n = s.w11_runs;
    for _ in 0..s.reps.max(3) {
        let (p, p_cpu) = burst(b, "steps", runs_n, steps, RunStatus::Pending).await?;
        let (k, k_cpu) = burst(b, "kv_steps", runs_n, steps, RunStatus::Pending).await?;
        plain.push(p);
        kv.push(k);
        cpu_per_put.push((k_cpu - p_cpu) * 1e6 / (runs_n * steps as usize) as f64);
    }
    let (p, k) = (median(plain), median(kv));
    rows.push(Row {
        id: "W11",
        workload: format!("{runs_n} runs x {steps} steps at once, each step putting one key"),
        value: k,
        unit: "steps/s",
        baseline: Some((p, "steps/s, the same runs without a put")),
        ratio: Some(p / k),
        target: "report".into(),
        extra: json!({ "cpu_us_per_put": median(cpu_per_put) }),
    });
    Ok(rows)
}

/// `runs` runs of `steps` steps of `mode` at once on a fresh database at
/// power durability: steps/s, and the process's CPU seconds meanwhile.
async fn burst(b: &mut Bench, mode: &str, runs: usize, steps: u32, status: RunStatus) -> Result<(f64, f64)> {
    let h = b.host("W11", Durability::Power, None).await?;
    let created = h.create(runs, &json!({"mode": mode, "n": steps}), status).await?;
    let cpu = process_cpu();
    let took = h.execute_all(created).await?;
    let cpu = (process_cpu() - cpu).as_secs_f64();
    Ok(((runs * steps as usize) as f64 / took.as_secs_f64(), cpu))
}
