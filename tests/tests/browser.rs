//! The web view in real headless Chromium, driven through WebDriver
//! (chromedriver): sign in with a token, upload and start the onboarding
//! workflow, watch its steps appear live with its two branches drawn side
//! by side, send a signal and cancel a run from the page. Screenshots go to
//! `target/screenshots/`.
//!
//! `make test` installs Debian's chromium and chromium-driver first
//! (`scripts/ensure-chromium.sh`); CAIRN_CHROMIUM and CAIRN_CHROMEDRIVER
//! name other binaries.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_e2e::http::{call, serve, start_run, token, upload, wait_status};
use cairn_e2e::{World, guest, wait_until};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// A generous bound: a test fails only if something never happens.
const SOON: Duration = Duration::from_secs(60);

/// chromedriver in a process group of its own, with the Chromium it
/// starts: dropping it (a failed test too) kills the whole group, so no
/// browser outlives the test.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn binary(env: &str, default: &str) -> String {
    let path = std::env::var(env).unwrap_or_else(|_| default.to_string());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: run scripts/ensure-chromium.sh (make test does), or set {env}"
    );
    path
}

/// chromedriver on a free loopback port, and a headless Chromium session.
async fn browser(w: &World) -> (Driver, Client) {
    let driver_bin = binary("CAIRN_CHROMEDRIVER", "/usr/bin/chromedriver");
    let chromium = binary("CAIRN_CHROMIUM", "/usr/bin/chromium");
    let port = free_port();
    let driver = Command::new(driver_bin)
        .process_group(0)
        .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver(driver);
    wait_until("chromedriver to listen", SOON, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let profile = w.subdir("chromium-profile");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            // Root needs --no-sandbox; the machine's network is closed, so
            // Chromium's own background connections are turned off.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1440,1000", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-quic",
                     format!("--user-data-dir={}", profile.display())],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session starts");
    (driver, client)
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("a screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

/// Wait until `script` (a JS expression) is truthy; returns its value.
async fn until(c: &Client, what: &str, script: &str) -> Value {
    let start = Instant::now();
    loop {
        let v = c.execute(&format!("return ({script});"), vec![]).await.expect("the script runs");
        if !(v.is_null() || v == json!(false) || v == json!(0) || v == json!("")) {
            return v;
        }
        assert!(start.elapsed() < SOON, "the page never showed {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn click(c: &Client, css: &str) {
    c.wait().at_most(SOON).for_element(Locator::Css(css)).await.expect(css).click().await.expect(css);
}

async fn type_into(c: &Client, css: &str, text: &str) {
    let el = c.wait().at_most(SOON).for_element(Locator::Css(css)).await.expect(css);
    el.clear().await.unwrap();
    el.send_keys(text).await.unwrap();
}

/// Counts of timeline rows by kind, as the page draws them.
async fn lanes(c: &Client) -> (u64, u64) {
    let v = c
        .execute(
            "return [document.querySelectorAll('.trow[data-kind=step]').length, \
                     document.querySelectorAll('.trow[data-kind=branch]').length];",
            vec![],
        )
        .await
        .unwrap();
    (v[0].as_u64().unwrap(), v[1].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_shows_runs_live_and_acts_on_them() {
    let w = World::new("browser");
    let admin = token(&w, "admin");
    // Runs waiting for a signal park at once (and show as `waiting`).
    let server = serve(&w, &["--park-after", "0"]);
    let base = server.base.clone();
    let (_driver, c) = browser(&w).await;

    // Sign in: the token is asked for once, and kept in the tab.
    c.goto(&base).await.unwrap();
    type_into(&c, "#token-input", &admin).await;
    click(&c, "#token-save").await;
    until(&c, "the runs list", "document.querySelector('#runs-body')").await;
    let stored = c.execute("return sessionStorage.getItem('cairn.token');", vec![]).await.unwrap();
    assert_eq!(stored, json!(admin));

    // Upload the onboarding workflow and start it from the page.
    c.goto(&format!("{base}/#/new")).await.unwrap();
    let wasm = guest("onboarding").canonicalize().unwrap();
    let file = c.wait().at_most(SOON).for_element(Locator::Css("#module-file")).await.unwrap();
    file.send_keys(&wasm.display().to_string()).await.unwrap();
    click(&c, "#upload").await;
    let hash = until(&c, "the uploaded module", "document.querySelector('#uploaded-hash')?.textContent").await;
    assert_eq!(hash.as_str().unwrap().len(), 64);
    let input = json!({"name": "Ada Lovelace", "email": "ada@example.com", "team": "engines", "simulate_ms": 600});
    type_into(&c, "#start-input", &input.to_string()).await;
    type_into(&c, "#start-run-id", "onboard-ada").await;
    shot(&c, "1-upload-and-start").await;
    click(&c, "#start-run").await;
    until(&c, "the run page", "location.hash === '#/runs/onboard-ada' && document.querySelector('#run-id')").await;
    // Marks this page load: a reload would lose it.
    c.execute("window.__cairnPageLoad = 'first';", vec![]).await.unwrap();

    // The steps appear while the run goes on, without a reload.
    let mut seen = vec![lanes(&c).await];
    let start = Instant::now();
    loop {
        let now = lanes(&c).await;
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        if now == (4, 2) {
            break;
        }
        assert!(start.elapsed() < SOON, "the timeline stopped at {now:?} (seen {seen:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen[0] != (4, 2) && seen.len() >= 2, "the timeline grew while the page was open: {seen:?}");
    until(&c, "the run completed", "document.querySelector('#run-status [data-status=completed]')").await;
    let load = c.execute("return window.__cairnPageLoad;", vec![]).await.unwrap();
    assert_eq!(load, json!("first"), "the page was never reloaded");

    // The two branches: on two rows, overlapping in time and on screen.
    let bars = c.find_all(Locator::Css(".trow[data-kind=branch] .bar")).await.unwrap();
    assert_eq!(bars.len(), 2, "one bar per branch");
    let (ax, ay, aw, _) = bars[0].rectangle().await.unwrap();
    let (bx, by, bw, _) = bars[1].rectangle().await.unwrap();
    assert!(ay != by, "the branches are drawn side by side, on their own rows ({ay} and {by})");
    assert!(ax < bx + bw && bx < ax + aw, "the branch bars overlap in time: {ax}+{aw} and {bx}+{bw}");
    let times = c
        .execute(
            "return [...document.querySelectorAll('.trow[data-kind=branch] .bar')].map(b => [+b.dataset.start, +b.dataset.end]);",
            vec![],
        )
        .await
        .unwrap();
    let (a, b) = (&times[0], &times[1]);
    assert!(a[0].as_f64() < b[1].as_f64() && b[0].as_f64() < a[1].as_f64(), "overlapping times: {times}");
    click(&c, ".trow[data-kind=step][data-name=send_email]").await;
    until(&c, "the step's attempts", "document.querySelector('#step-detail table.attempts')").await;
    shot(&c, "2-onboarding-run").await;

    // A run waiting for a signal gets it from the page.
    let signals = upload(&base, &admin, "signals");
    let waits = json!({"waits": [{"name": "approve"}]});
    for id in ["sig-web", "cancel-web"] {
        start_run(&base, &admin, &signals, waits.clone(), id);
        wait_status(&base, &admin, id, "waiting");
    }
    c.goto(&format!("{base}/#/runs/sig-web")).await.unwrap();
    until(&c, "the waiting run", "document.querySelector('#run-status [data-status=waiting]')").await;
    until(&c, "the wait drawn as a gap", "document.querySelector('.trow[data-kind=pending] .bar.wait')").await;
    type_into(&c, "#signal-name", "approve").await;
    type_into(&c, "#signal-payload", r#"{"by": "browser"}"#).await;
    click(&c, "#signal-send").await;
    until(&c, "the signalled run completed", "document.querySelector('#run-status [data-status=completed]')").await;
    let (_, run) = call("GET", &format!("{base}/api/runs/sig-web"), Some(&admin), None);
    assert_eq!(run["output"], json!([{"by": "browser"}]), "{run}");
    shot(&c, "3-signal-sent").await;

    // Another is cancelled from the page.
    c.goto(&format!("{base}/#/runs/cancel-web")).await.unwrap();
    until(&c, "the waiting run", "document.querySelector('#run-status [data-status=waiting]')").await;
    click(&c, "#cancel-run").await;
    c.accept_alert().await.unwrap();
    until(&c, "the cancelled run", "document.querySelector('#run-status [data-status=cancelled]')").await;
    wait_status(&base, &admin, "cancel-web", "cancelled");
    shot(&c, "4-cancelled").await;

    // A 10,000-step run: its history comes in pages and is drawn in chunks.
    let flow = upload(&base, &admin, "benchflow");
    let body = json!({"module": flow, "input": {"mode": "steps", "n": 10_000}, "run_id": "long"});
    let (status, reply) = call("POST", &format!("{base}/api/runs"), Some(&admin), Some(body.to_string().as_bytes()));
    assert_eq!(status, 201, "{reply}");
    wait_status(&base, &admin, "long", "completed");
    let start = Instant::now();
    c.goto(&format!("{base}/#/runs/long")).await.unwrap();
    until(&c, "10,000 rows", "document.querySelectorAll('#timeline-rows .trow').length === 10000").await;
    eprintln!("the page of a 10,000-step run was drawn in {:?}", start.elapsed());
    c.execute("document.querySelector('#timeline-rows').lastElementChild.scrollIntoView();", vec![]).await.unwrap();
    shot(&c, "5-long-run-end").await;

    // The list shows all four, with their final statuses.
    c.goto(&format!("{base}/#/")).await.unwrap();
    until(&c, "four runs", "document.querySelectorAll('#runs-body tr[data-run]').length === 4").await;
    let statuses = c
        .execute(
            "return [...document.querySelectorAll('#runs-body [data-status]')].map(b => b.dataset.status);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(statuses, json!(["completed", "cancelled", "completed", "completed"]), "newest first");
    shot(&c, "6-runs-list").await;
    c.close().await.unwrap();
    drop(server);
}
