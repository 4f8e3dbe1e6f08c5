//! Kill the host with SIGKILL mid-run, resume, and check that nothing
//! committed ran again, nothing was lost, and replayed workflow code saw the
//! same clock and random values as before the kill.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_e2e::{World, count_lines, guest, json_stdout, kill9, text, wait_until};
use serde_json::Value;

const STEPS: u32 = 200;

fn input(steps: u32, work_ms: u64) -> String {
    format!(r#"{{"steps":{steps},"work_ms":{work_ms},"log":"/data/log.txt","observe_every":10}}"#)
}

#[derive(Default, Debug)]
struct Log {
    /// step index -> keys logged for it (one per execution of its closure)
    steps: BTreeMap<u64, Vec<String>>,
    /// observation index -> (wall, random, monotonic) per execution
    observed: BTreeMap<u64, Vec<(u64, u64, u64)>>,
}

fn parse_log(text: &str) -> Log {
    let mut log = Log::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["step", i, key] => log.steps.entry(i.parse().unwrap()).or_default().push(key.to_string()),
            ["obs", i, w, r, m] => log.observed.entry(i.parse().unwrap()).or_default().push((
                w.parse().unwrap(),
                r.parse().unwrap(),
                m.parse().unwrap(),
            )),
            _ => panic!("unexpected log line {line:?}"),
        }
    }
    log
}

/// A small xorshift so kill points differ between runs without a crate.
fn kill_points(n: usize) -> Vec<usize> {
    let mut x = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            50 + (x % 150) as usize // the log has 220 lines in all
        })
        .collect()
}

fn completed_work_steps(show: &Value) -> usize {
    show["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "step" && e["name"] == "work" && e["status"] == "completed")
        .count()
}

#[test]
fn killed_runs_resume_without_rerunning_or_losing_steps() {
    let w = World::new("crash");
    let wasm = guest("crashtest");
    let wasm = wasm.to_str().unwrap();

    let base_dir = w.subdir("base");
    let base = json_stdout(&w.run(&[
        "run",
        wasm,
        "--run-id",
        "base",
        "--dir",
        &format!("{}::/data", base_dir.display()),
        "--input",
        &input(STEPS, 0),
    ]));
    let expected_sum: u64 = (0..STEPS as u64).map(|i| i * i).sum();
    assert_eq!(base["sum"], expected_sum);

    let points = kill_points(4);
    eprintln!("kill points (log lines): {points:?}");
    for (round, &point) in points.iter().enumerate() {
        let data = w.subdir(&format!("round{round}"));
        let log_path = data.join("log.txt");
        let id = format!("crash-{round}");
        let grant = format!("{}::/data", data.display());
        let mut child = w.spawn(&["run", wasm, "--run-id", &id, "--dir", &grant, "--input", &input(STEPS, 3)], &id);
        wait_until("log lines before the kill", Duration::from_secs(120), || count_lines(&log_path) >= point);
        kill9(&mut child);

        // The last round is killed a second time, during its resume.
        if round == points.len() - 1 {
            let again = (point + 30).min(215);
            let mut child = w.spawn(&["resume", &id], &format!("{id}-resume1"));
            wait_until("log lines before the second kill", Duration::from_secs(120), || {
                count_lines(&log_path) >= again
            });
            kill9(&mut child);
        }

        let before_kill = parse_log(&std::fs::read_to_string(&log_path).unwrap());
        let history_before = w.show(&id);
        assert_eq!(history_before["status"], "running", "a killed run stays unfinished");
        let resumed_from = completed_work_steps(&history_before);

        let out = w.run(&["resume", &id]);
        let result = json_stdout(&out);
        let after = parse_log(&std::fs::read_to_string(&log_path).unwrap());

        // Every step ran; only a step in flight at a kill ran twice.
        assert_eq!(after.steps.len(), STEPS as usize, "every step index appears");
        let twice: Vec<_> = after.steps.iter().filter(|(_, keys)| keys.len() > 1).map(|(i, _)| *i).collect();
        let kills = if round == points.len() - 1 { 2 } else { 1 };
        assert!(twice.len() <= kills, "round {round}: steps run twice: {twice:?}");
        assert!(after.steps.values().all(|keys| keys.len() <= 2));

        // Same result as an uninterrupted run.
        assert_eq!(result["sum"], base["sum"], "round {round}: final output differs");
        // Idempotency keys are stable: every execution of a step logged the
        // key the final output holds.
        for (i, keys) in &after.steps {
            let final_key = result["keys"][i.to_string()].as_str().unwrap();
            assert!(keys.iter().all(|k| k == final_key), "round {round}: step {i} keys {keys:?} vs {final_key}");
        }

        // Clock and random values read before the kill are the values the
        // resumed workflow computed with, and a step re-run after the kill
        // was handed the same values.
        let observed: BTreeMap<u64, (u64, u64, u64)> = result["observed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o[0].as_u64().unwrap(), (o[1].as_u64().unwrap(), o[2].as_u64().unwrap(), o[3].as_u64().unwrap())))
            .collect();
        assert_eq!(observed.len(), (STEPS / 10) as usize);
        assert!(!before_kill.observed.is_empty());
        for (i, seen) in &after.observed {
            for v in seen {
                assert_eq!(Some(v), observed.get(i), "round {round}: observation {i} changed across the kill");
            }
        }
        // Random bytes come from the run's own key: another run reads
        // others, and reads outside steps leave no history entry (so no
        // commit waits on them before the next step).
        let base_randoms: BTreeSet<u64> =
            base["observed"].as_array().unwrap().iter().map(|o| o[2].as_u64().unwrap()).collect();
        assert!(
            observed.values().all(|v| !base_randoms.contains(&v.1)),
            "round {round}: random values repeat another run's"
        );
        let kinds: BTreeSet<&str> =
            history_before["history"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert!(!kinds.contains("random"), "round {round}: random reads were journaled: {kinds:?}");
        let monos: Vec<u64> = observed.values().map(|v| v.2).collect();
        assert!(monos.windows(2).all(|p| p[0] < p[1]), "monotonic time went backwards: {monos:?}");

        // Guest output replayed from the history is not printed again.
        let printed: BTreeSet<u32> = text(&out.stderr)
            .lines()
            .filter_map(|l| l.strip_prefix("before step "))
            .map(|n| n.trim().parse().unwrap())
            .collect();
        let expected: BTreeSet<u32> = (resumed_from as u32..STEPS).collect();
        assert_eq!(printed, expected, "round {round}: resumed after {resumed_from} steps");

        // The history holds each step once.
        let show = w.show(&id);
        assert_eq!(show["status"], "completed");
        assert_eq!(completed_work_steps(&show), STEPS as usize);
    }
}

#[test]
fn resuming_a_completed_run_prints_its_output_again() {
    let w = World::new("resume-done");
    let data = w.subdir("data");
    let wasm = guest("crashtest");
    let grant = format!("{}::/data", data.display());
    let first = w.run(&["run", wasm.to_str().unwrap(), "--run-id", "done", "--dir", &grant, "--input", &input(5, 0)]);
    let first = json_stdout(&first);
    let lines = count_lines(&data.join("log.txt"));
    let again = json_stdout(&w.run(&["resume", "done"]));
    assert_eq!(first, again);
    assert_eq!(count_lines(&data.join("log.txt")), lines, "no step ran again");
}

/// A run created before runs had random keys (its key is NULL) journals
/// the random bytes its workflow code reads, and a resume after a kill
/// replays them from the history.
#[test]
fn runs_without_a_random_key_replay_journaled_randomness() {
    let w = World::sqlite("legacy-random");
    let wasm = guest("crashtest");
    let data = w.subdir("data");
    let log_path = data.join("log.txt");
    let grant = format!("{}::/data", data.display());
    let started =
        w.run(&["start", wasm.to_str().unwrap(), "--run-id", "old", "--dir", &grant, "--input", &input(40, 5)]);
    assert!(started.status.success(), "{}", text(&started.stderr));
    let script = format!(
        "import sqlite3\nc = sqlite3.connect({db:?}); c.execute(\"update runs set random_key = null where id = 'old'\"); \
         c.commit(); c.close()\n",
        db = w.db.display().to_string()
    );
    let py = std::process::Command::new("python3").arg("-c").arg(&script).status().expect("python3 is on the machine");
    assert!(py.success());

    let mut child = w.spawn(&["resume", "old"], "old-resume");
    wait_until("log lines before the kill", Duration::from_secs(120), || count_lines(&log_path) >= 25);
    kill9(&mut child);
    let before_kill = parse_log(&std::fs::read_to_string(&log_path).unwrap());
    let kinds: BTreeSet<String> =
        w.show("old")["history"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap().to_string()).collect();
    assert!(kinds.contains("random"), "a run without a key journals its random reads: {kinds:?}");

    let result = json_stdout(&w.run(&["resume", "old"]));
    let observed: BTreeMap<u64, u64> = result["observed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o[0].as_u64().unwrap(), o[2].as_u64().unwrap()))
        .collect();
    assert!(!before_kill.observed.is_empty());
    for (i, seen) in &before_kill.observed {
        for v in seen {
            assert_eq!(Some(&v.1), observed.get(i), "observation {i}: the random value changed across the kill");
        }
    }
}
