//! Printing for people: tables and the run page of `cairn show`. JSON
//! output comes from `service::views` as it is.

use std::io::Write as _;

use serde_json::Value;

use crate::model::{EntryKind, RunRecord, TokenRecord};
use crate::service::views::{self, RunView, entry_output, output_json, time};
use crate::terminal::escape;

/// A run's output on stdout, one line.
pub fn output(output: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(output);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

fn json_pretty(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON"));
}

fn table(header: &[&str]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(header);
    table
}

/// At most `max` characters of a value's JSON text, escaped for a terminal.
fn short(v: &Value, max: usize) -> String {
    let s = if v.is_null() { String::new() } else { escape(&v.to_string()).into_owned() };
    if s.chars().count() > max { format!("{}…", s.chars().take(max - 1).collect::<String>()) } else { s }
}

fn text(s: &str) -> String {
    escape(s).into_owned()
}

/// `cairn runs`.
pub fn runs(runs: &[RunRecord], json: bool) {
    if json {
        json_pretty(&Value::Array(runs.iter().map(views::run_summary).collect()));
        return;
    }
    let mut t = table(&["ID", "STATUS", "STEPS", "MODULE", "CREATED", "FINISHED"]);
    for r in runs {
        t.add_row([
            text(&r.id),
            r.status.as_str().to_string(),
            r.steps.to_string(),
            r.module.chars().take(12).collect(),
            time(r.created_at),
            r.finished_at.map(time).unwrap_or_default(),
        ]);
    }
    println!("{t}");
}

/// `cairn kv list`.
pub fn kv_list(rows: &[(String, crate::store::KvValue)], json: bool) {
    if json {
        json_pretty(&Value::Array(rows.iter().map(|(k, v)| views::kv_entry(k, v)).collect()));
        return;
    }
    let mut t = table(&["KEY", "VALUE", "VERSION", "UPDATED"]);
    for (key, v) in rows {
        let value = String::from_utf8_lossy(v.value.as_deref().unwrap_or_default()).into_owned();
        let shown = if value.chars().count() > 60 {
            format!("{}…", value.chars().take(60).collect::<String>())
        } else {
            value
        };
        t.add_row([text(key), text(&shown), v.version.to_string(), time(v.updated_at)]);
    }
    println!("{t}");
}

/// `cairn token list`.
pub fn tokens(tokens: &[TokenRecord], json: bool) {
    if json {
        let list: Vec<Value> = tokens
            .iter()
            .map(|t| {
                serde_json::json!({
                    "id": t.id, "name": t.name, "role": t.role,
                    "created_at": time(t.created_at), "revoked_at": t.revoked_at.map(time),
                })
            })
            .collect();
        json_pretty(&Value::Array(list));
        return;
    }
    let mut t = table(&["ID", "NAME", "ROLE", "CREATED", "REVOKED"]);
    for k in tokens {
        t.add_row([
            k.id.clone(),
            text(&k.name),
            k.role.as_str().to_string(),
            time(k.created_at),
            k.revoked_at.map(time).unwrap_or_default(),
        ]);
    }
    println!("{t}");
}

/// `cairn show`.
pub fn run_view(view: &RunView, json: bool) {
    if json {
        json_pretty(&view.to_json());
        return;
    }
    let run = &view.run;
    println!("run      {}", text(&run.id));
    println!("status   {}", run.status.as_str());
    println!("module   {} ({})", run.module, text(&run.module_path));
    println!("created  {}", time(run.created_at));
    if let Some(f) = run.finished_at {
        println!("finished {}", time(f));
    }
    if let Some(out) = &run.output {
        println!("output   {}", short(&output_json(Some(out)), 200));
    }
    if let Some(err) = &run.error {
        println!("error    {}", text(err));
    }
    let mut t = table(&["POS", "KIND", "NAME", "OCC", "ATTEMPT", "STATUS", "DURATION", "OUTPUT / ERROR"]);
    for (i, e) in view.history.iter().enumerate() {
        let (output, error, status) = if e.kind == EntryKind::Spawn {
            let state = view.spawn_state(e);
            (state.output, state.error, state.status)
        } else {
            (entry_output(e), e.error.clone(), e.status.as_str().to_string())
        };
        let detail = match error {
            Some(err) => short(&Value::String(err), 60),
            None => short(&output, 60),
        };
        let is_step = matches!(e.kind, EntryKind::Step | EntryKind::Spawn);
        t.add_row([
            i.to_string(),
            e.kind.as_str().to_string(),
            text(&e.name),
            if is_step { e.occurrence.to_string() } else { String::new() },
            if e.kind == EntryKind::Step { e.attempt.to_string() } else { String::new() },
            status,
            if e.kind == EntryKind::Step {
                format!("{} ms", e.finished_at.saturating_sub(e.started_at))
            } else {
                String::new()
            },
            detail,
        ]);
    }
    println!("\n{t}");
    if !view.branches.is_empty() {
        let mut t = table(&["BRANCH", "OCC", "ATTEMPT", "STATUS", "DURATION", "OUTPUT / ERROR"]);
        for b in &view.branches {
            let detail = match &b.error {
                Some(err) => short(&Value::String(err.clone()), 60),
                None => short(&entry_output(b), 60),
            };
            t.add_row([
                text(&b.name),
                b.occurrence.to_string(),
                b.attempt.to_string(),
                b.status.as_str().to_string(),
                format!("{} ms", b.finished_at.saturating_sub(b.started_at)),
                detail,
            ]);
        }
        println!("\nbranch attempts, in the order they ended:\n{t}");
    }
}
