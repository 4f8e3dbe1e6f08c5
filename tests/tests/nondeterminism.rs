//! A replay that asks for different steps than the history holds stops with
//! a clear error and leaves the history untouched.

use std::time::Duration;

use cairn_e2e::{World, count_lines, guest, json_stdout, kill9, text, wait_until};

#[test]
fn changed_step_names_are_detected_and_the_history_is_kept() {
    let w = World::new("nondet");
    let data = w.subdir("data");
    let names = data.join("names.txt");
    std::fs::write(&names, "alpha\nbravo\ncharlie\ndelta\necho\nfoxtrot\ngolf\nhotel\n").unwrap();
    let wasm = guest("divergent");
    let grant = format!("{}::/data", data.display());
    let input = r#"{"names_file":"/data/names.txt","log":"/data/log.txt","step_ms":150}"#;
    let mut child =
        w.spawn(&["run", wasm.to_str().unwrap(), "--run-id", "nd", "--dir", &grant, "--input", input], "nd");
    wait_until("two steps", Duration::from_secs(60), || count_lines(&data.join("log.txt")) >= 2);
    kill9(&mut child);
    let before = w.show("nd");
    assert!(before["history"].as_array().unwrap().iter().any(|e| e["name"] == "alpha"));

    // The workflow reads its step names from this file: change the first.
    std::fs::write(&names, "zulu\nbravo\ncharlie\ndelta\necho\nfoxtrot\ngolf\nhotel\n").unwrap();
    let out = w.run(&["resume", "nd"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "non-determinism exit code; stderr: {err}");
    assert!(out.stdout.is_empty());
    for needle in
        ["non-determinism", "run nd", "position", "step \"alpha\" #1", "step \"zulu\" #1", "history is unchanged"]
    {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
    let after = w.show("nd");
    assert_eq!(before["history"], after["history"], "the history must be untouched");
    assert_eq!(before["status"], after["status"]);

    // Put the file back: the run continues from where it was.
    std::fs::write(&names, "alpha\nbravo\ncharlie\ndelta\necho\nfoxtrot\ngolf\nhotel\n").unwrap();
    let done = json_stdout(&w.run(&["resume", "nd"]));
    assert_eq!(done, serde_json::json!(["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL"]));
}
