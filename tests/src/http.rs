//! Driving `cairn serve` from tests: start it on a free loopback port, make
//! tokens, call its routes with a real HTTP client, read its event streams.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{World, guest, text, wait_until};

/// A `cairn serve` child process, killed when dropped.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(w: &World, extra: &[&str]) -> Server {
    serve_as(w, "serve", extra)
}

/// `serve`, its output in `{tag}.stdout` and `{tag}.stderr`: for several
/// servers in one world.
pub fn serve_as(w: &World, tag: &str, extra: &[&str]) -> Server {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
    args.extend(extra);
    let child = w.spawn(&args, tag);
    let mut base = String::new();
    wait_until("the server to listen", Duration::from_secs(30), || {
        let err = w.read(&format!("{tag}.stderr"));
        // Whole lines only: the server may be halfway through writing one.
        let whole = &err[..err.rfind('\n').map_or(0, |end| end + 1)];
        match whole.lines().find_map(|l| l.split("listening on ").nth(1)) {
            Some(addr) => {
                base = addr.trim().to_string();
                true
            }
            None => false,
        }
    });
    Server { child, base }
}

pub fn token(w: &World, role: &str) -> String {
    let out = w.run(&["token", "create", "--role", role]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// (status, JSON body) of a request; `token` None sends no Authorization.
pub fn call(method: &str, url: &str, token: Option<&str>, body: Option<&[u8]>) -> (u16, Value) {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(30));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let result = match body {
        Some(b) => req.set("Content-Type", "application/x-www-form-urlencoded").send_bytes(b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// An event stream, open (subscribed) once `open_events` returns: its SSE
/// events (id, event, data) as they arrive.
pub struct Events {
    lines: std::io::Lines<BufReader<Box<dyn std::io::Read + Send + Sync>>>,
}

pub fn open_events(base: &str, path: &str, token: &str, last_id: Option<u64>) -> Events {
    let mut req = ureq::get(&format!("{base}{path}"))
        .set("Authorization", &format!("Bearer {token}"))
        .timeout(Duration::from_secs(60));
    if let Some(id) = last_id {
        req = req.set("Last-Event-ID", &id.to_string());
    }
    let resp = req.call().expect("the event stream opens");
    Events { lines: BufReader::new(resp.into_reader()).lines() }
}

impl Iterator for Events {
    type Item = (u64, String, Value);

    fn next(&mut self) -> Option<Self::Item> {
        let (mut id, mut kind, mut data) = (0u64, String::new(), Value::Null);
        loop {
            let line = self.lines.next().expect("the stream goes on").expect("a line");
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse().unwrap();
            } else if let Some(v) = line.strip_prefix("event:") {
                kind = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data = serde_json::from_str(v.trim()).unwrap();
            } else if line.is_empty() && !kind.is_empty() {
                return Some((id, kind, data));
            }
        }
    }
}

/// Read SSE events (id, event, data) until `n` arrived.
pub fn read_events(base: &str, path: &str, token: &str, last_id: Option<u64>, n: usize) -> Vec<(u64, String, Value)> {
    open_events(base, path, token, last_id).take(n).collect()
}

pub fn upload(base: &str, admin: &str, name: &str) -> String {
    let bytes = std::fs::read(guest(name)).unwrap();
    let (status, body) = call("POST", &format!("{base}/api/modules"), Some(admin), Some(&bytes));
    assert!(status == 201 || status == 200, "{status} {body}");
    body["hash"].as_str().unwrap().to_string()
}

/// `POST /api/runs` of `module` with `input` as run `id`, which must be created.
pub fn start_run(base: &str, token: &str, module: &str, input: Value, id: &str) {
    let body = serde_json::json!({"module": module, "input": input, "run_id": id});
    let (status, reply) = call("POST", &format!("{base}/api/runs"), Some(token), Some(body.to_string().as_bytes()));
    assert_eq!(status, 201, "{reply}");
}

pub fn wait_status(base: &str, token: &str, id: &str, want: &str) -> Value {
    let start = Instant::now();
    loop {
        let (status, run) = call("GET", &format!("{base}/api/runs/{id}"), Some(token), None);
        assert_eq!(status, 200, "{run}");
        if run["status"] == want {
            return run;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "run {id} stayed {}", run["status"]);
        std::thread::sleep(Duration::from_millis(20));
    }
}
