//! W9 and W10: `cairn serve` as users run it (the real binary, a real
//! database), driven over loopback by a hyper HTTP/1.1 client on
//! keep-alive connections.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Bench, Row, median};

/// A `cairn serve` child, killed when dropped.
struct Server {
    child: tokio::process::Child,
    addr: SocketAddr,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn start_server(b: &Bench, db: &Path, extra: &[&str]) -> Result<Server> {
    let made = tokio::process::Command::new(&b.cairn)
        .arg("--db")
        .arg(db)
        .args(["token", "create", "--role", "admin"])
        .output()
        .await?;
    if !made.status.success() {
        bail!("token create: {}", String::from_utf8_lossy(&made.stderr));
    }
    let token = String::from_utf8(made.stdout)?.trim().to_string();
    let mut child = tokio::process::Command::new(&b.cairn)
        .arg("--db")
        .arg(db)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("CAIRN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().context("serve's stderr")?).lines();
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("cairn serve did not start listening")??
            .context("cairn serve exited")?;
        if let Some(addr) = line.split("listening on http://").nth(1) {
            break addr.trim().parse()?;
        }
    };
    // Drain the rest, so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Server { child, addr, token })
}

/// One keep-alive HTTP/1.1 connection.
async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

fn request(method: &str, addr: SocketAddr, path: &str, token: &str, body: Bytes) -> Result<Request<Full<Bytes>>> {
    Ok(Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(body))?)
}

/// Send and read the whole answer: (status, body).
async fn call(send: &mut SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> Result<(u16, Bytes)> {
    send.ready().await?;
    let res = send.send_request(req).await?;
    let status = res.status().as_u16();
    Ok((status, res.into_body().collect().await?.to_bytes()))
}

async fn upload(server: &Server, wasm: &Path) -> Result<String> {
    let mut send = connect(server.addr).await?;
    let req = request("POST", server.addr, "/api/modules", &server.token, std::fs::read(wasm)?.into())?;
    let (status, body) = call(&mut send, req).await?;
    if status != 201 && status != 200 {
        bail!("upload: {status} {}", String::from_utf8_lossy(&body));
    }
    let v: Value = serde_json::from_slice(&body)?;
    Ok(v["hash"].as_str().context("a hash")?.to_string())
}

/// `n` POST /api/runs from `connections` connections; the seconds it took.
async fn post_runs(server: &Server, hash: &str, n: usize, connections: usize) -> Result<f64> {
    let body = Bytes::from(json!({"module": hash, "input": {"mode": "tiny"}}).to_string());
    post_crowd(server, n, connections, |_| "/api/runs".to_string(), body, 201).await
}

/// `n` POST of `body` from `connections` connections, the i-th to
/// `path(i)`, each answered `status`; the seconds it took.
async fn post_crowd(
    server: &Server,
    n: usize,
    connections: usize,
    path: impl Fn(usize) -> String + Clone + Send + 'static,
    body: Bytes,
    status: u16,
) -> Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut conns = Vec::new();
    for _ in 0..connections {
        conns.push(connect(server.addr).await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut send in conns {
        let (next, body, token, addr, path) =
            (next.clone(), body.clone(), server.token.clone(), server.addr, path.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let path = path(i);
                let (got, reply) = call(&mut send, request("POST", addr, &path, &token, body.clone())?).await?;
                if got != status {
                    bail!("POST {path}: {got} {}", String::from_utf8_lossy(&reply));
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The ids of up to 1,000 of the server's runs.
async fn some_run_ids(server: &Server) -> Result<Vec<String>> {
    let mut send = connect(server.addr).await?;
    let req = request("GET", server.addr, "/api/runs?limit=1000", &server.token, Bytes::new())?;
    let (status, body) = call(&mut send, req).await?;
    if status != 200 {
        bail!("GET /api/runs: {status} {}", String::from_utf8_lossy(&body));
    }
    let page: Value = serde_json::from_slice(&body)?;
    let ids: Vec<String> = page["runs"]
        .as_array()
        .context("a page of runs")?
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    if ids.is_empty() {
        bail!("GET /api/runs: no runs");
    }
    Ok(ids)
}

/// W9's sizes: runs posted to warm up, runs measured, connections.
fn w9_sizes(quick: bool) -> (usize, usize, usize) {
    if quick { (50, 200, 8) } else { (2_000, 20_000, 64) }
}

/// One repetition of W9 on `db` (an SQLite path or a PostgreSQL URL).
pub(super) struct W9Crowd {
    /// Runs accepted per second.
    pub(super) runs_per_s: f64,
    /// Signals accepted per second, then, to 1,000 of those runs (a signal's
    /// cap counts the run's undelivered ones: fewer runs, more to count).
    pub(super) signals_per_s: f64,
    /// How many runs, and how many signals, the database must then hold
    /// (accepted means durable).
    pub(super) posted: usize,
}

pub(super) async fn w9_crowd(b: &Bench, db: &str) -> Result<W9Crowd> {
    let (warm, n, connections) = w9_sizes(b.quick);
    let server = start_server(b, Path::new(db), &["--no-worker"]).await?;
    let hash = upload(&server, &b.guest).await?;
    post_runs(&server, &hash, warm, connections).await?;
    let took = post_runs(&server, &hash, n, connections).await?;
    let ids = Arc::new(some_run_ids(&server).await?);
    let signal = move |i: usize| format!("/api/runs/{}/signals/go", ids[i % ids.len()]);
    post_crowd(&server, warm, connections, signal.clone(), Bytes::from_static(b"1"), 202).await?;
    let signals_took = post_crowd(&server, n, connections, signal, Bytes::from_static(b"1"), 202).await?;
    Ok(W9Crowd { runs_per_s: n as f64 / took, signals_per_s: n as f64 / signals_took, posted: warm + n })
}

/// W9's row (`W9`, or `W9-pg` with `on` naming the database).
pub(super) fn w9_row(b: &Bench, id: &'static str, on: &str, crowds: &[W9Crowd], target: &str) -> Row {
    let (warm, n, connections) = w9_sizes(b.quick);
    let signalled = (warm + n).min(1000);
    let rates: Vec<f64> = crowds.iter().map(|c| c.runs_per_s).collect();
    let signals: Vec<f64> = crowds.iter().map(|c| c.signals_per_s).collect();
    Row {
        id,
        workload: format!(
            "{on}{n} POST /api/runs to cairn serve --no-worker, {connections} keep-alive connections \
             (then {n} POST /api/runs/{{id}}/signals/go to {signalled} of them: extra.signals_per_s)"
        ),
        value: median(rates.clone()),
        unit: "runs/s accepted",
        baseline: None,
        ratio: None,
        target: target.into(),
        extra: json!({
            "repetitions": rates,
            "warm_up": warm,
            "signals_per_s": median(signals.clone()),
            "signals_repetitions": signals,
        }),
    }
}

/// W9: runs accepted per second by `cairn serve --no-worker`.
pub(super) async fn w9(b: &mut Bench) -> Result<Row> {
    let mut crowds = Vec::new();
    for _ in 0..b.sizes.reps {
        let db = b.fresh_db("w9");
        let crowd = w9_crowd(b, &db.display().to_string()).await?;
        let conn = rusqlite::Connection::open(&db)?;
        let runs: i64 = conn.query_row("SELECT count(*) FROM runs", [], |r| r.get(0))?;
        let signals: i64 = conn.query_row("SELECT count(*) FROM signals", [], |r| r.get(0))?;
        if (runs as usize, signals as usize) != (crowd.posted, crowd.posted) {
            bail!("W9: {runs} runs and {signals} signals stored of {} each accepted", crowd.posted);
        }
        crowds.push(crowd);
    }
    Ok(w9_row(b, "W9", "", &crowds, ">= 20000"))
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Read one event stream until `stop`; the latency of each event, µs.
async fn listen(addr: SocketAddr, token: String, ready: Arc<AtomicUsize>, stop: Arc<AtomicUsize>) -> Result<Vec<i64>> {
    let mut send = connect(addr).await?;
    let mut req = request("GET", addr, "/api/events", &token, Bytes::new())?;
    req.headers_mut().insert("accept", "text/event-stream".parse()?);
    send.ready().await?;
    let res = send.send_request(req).await?;
    if res.status() != 200 {
        bail!("GET /api/events: {}", res.status());
    }
    ready.fetch_add(1, Ordering::SeqCst);
    let mut body = res.into_body();
    let (mut latencies, mut pending) = (Vec::new(), String::new());
    while stop.load(Ordering::SeqCst) == 0 {
        let Ok(frame) = tokio::time::timeout(Duration::from_millis(100), body.frame()).await else { continue };
        let Some(frame) = frame else { break };
        let Ok(data) = frame?.into_data() else { continue };
        let arrived = now_us();
        pending.push_str(std::str::from_utf8(&data)?);
        while let Some(nl) = pending.find('\n') {
            let line: String = pending.drain(..=nl).collect();
            if let Some(json) = line.strip_prefix("data:") {
                let v: Value = serde_json::from_str(json.trim())?;
                if let Some(ts) = v["ts_us"].as_i64() {
                    latencies.push(arrived - ts);
                }
            }
        }
    }
    Ok(latencies)
}

/// W10: commit-to-client latency of the event streams, 100 clients, one
/// run committing about 100 steps/s in the serving process.
pub(super) async fn w10(b: &mut Bench) -> Result<Row> {
    let (clients, steps) = if b.quick { (5, 20) } else { (100, 500) };
    let db = b.fresh_db("w10");
    let server = start_server(b, &db, &[]).await?;
    let hash = upload(&server, &b.guest).await?;
    let (ready, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut listeners = Vec::new();
    for _ in 0..clients {
        listeners.push(tokio::spawn(listen(server.addr, server.token.clone(), ready.clone(), stop.clone())));
    }
    while ready.load(Ordering::SeqCst) < clients {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut send = connect(server.addr).await?;
    let body = json!({"module": hash, "input": {"mode": "paced", "n": steps, "sleep_ms": 8}, "run_id": "paced"});
    let (status, reply) =
        call(&mut send, request("POST", server.addr, "/api/runs", &server.token, body.to_string().into())?).await?;
    if status != 201 {
        bail!("W10: start: {status} {}", String::from_utf8_lossy(&reply));
    }
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, run) =
            call(&mut send, request("GET", server.addr, "/api/runs/paced?history=false", &server.token, Bytes::new())?)
                .await?;
        let run: Value = serde_json::from_slice(&run)?;
        if run["status"] == "completed" {
            break;
        }
        if run["status"] == "failed" || start.elapsed() > Duration::from_secs(120) {
            bail!("W10: the run did not complete: {run}");
        }
    }
    let took = start.elapsed().as_secs_f64();
    // The last events reach the clients.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(1, Ordering::SeqCst);
    let mut all = Vec::new();
    for l in listeners {
        all.extend(l.await??);
    }
    if all.len() < clients * steps as usize {
        bail!("W10: {} events reached {clients} clients, fewer than {steps} each", all.len());
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    Ok(Row {
        id: "W10",
        workload: format!("{clients} clients on /api/events, 1 run committing {:.0} steps/s", steps as f64 / took),
        value: pct(0.99),
        unit: "ms p99 commit to client",
        baseline: None,
        ratio: None,
        target: "<= 5 ms".into(),
        extra: json!({ "events": all.len(), "p50_ms": pct(0.5), "p90_ms": pct(0.9), "max_ms": pct(1.0) }),
    })
}
