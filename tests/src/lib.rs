//! Helpers for the end-to-end tests: they drive the real `cairn` binary
//! (`target/release/cairn`, built by `make test`) on the real example
//! guests (`target/wasm32-wasip1/release/*.wasm`).

pub mod http;
pub mod torture;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"))
}

/// The `cairn` binary under test (`CAIRN_BIN` overrides).
pub fn cairn_bin() -> PathBuf {
    let bin = std::env::var_os("CAIRN_BIN").map(PathBuf::from).unwrap_or_else(|| target_dir().join("release/cairn"));
    assert!(bin.exists(), "{} is missing: run `make test` (it builds the host and the guests first)", bin.display());
    bin
}

/// A built example guest.
pub fn guest(name: &str) -> PathBuf {
    let path = target_dir().join("wasm32-wasip1/release").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} is missing: run `make test` (it builds the guests first)", path.display());
    path
}

/// One test's world: a scratch directory, a database in it, a shared
/// compiled-module cache.
pub struct World {
    pub dir: PathBuf,
    pub db: PathBuf,
    /// Processes `spawn` started: killed with the world, so that a failing
    /// test leaves no worker behind.
    spawned: std::sync::Mutex<Vec<u32>>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl World {
    /// A world on the backend of the test matrix: SQLite, or PostgreSQL
    /// when `CAIRN_E2E_BACKEND=postgres` (`make test` runs the suites that
    /// are not about SQLite itself a second time that way).
    pub fn new(name: &str) -> World {
        if matrix_postgres() {
            return World::postgres(name).expect("CAIRN_E2E_BACKEND=postgres needs CAIRN_TEST_PG");
        }
        World::sqlite(name)
    }

    /// A world whose database is an SQLite file in its scratch directory
    /// (for what is about SQLite itself: its file, its locks, its disk).
    pub fn sqlite(name: &str) -> World {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = target_dir().join("e2e").join(format!("{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let db = dir.join("cairn.db");
        World { dir, db, spawned: Default::default() }
    }

    /// A world whose database is a fresh PostgreSQL database on the server
    /// of `CAIRN_TEST_PG` (`make test` starts one). `None`, with a note,
    /// when there is none and `CAIRN_REQUIRE_PG` is not set.
    pub fn postgres(name: &str) -> Option<World> {
        let Ok(admin) = std::env::var("CAIRN_TEST_PG") else {
            assert!(std::env::var_os("CAIRN_REQUIRE_PG").is_none(), "CAIRN_REQUIRE_PG is set without CAIRN_TEST_PG");
            eprintln!("skipped: no PostgreSQL server (CAIRN_TEST_PG; `make test` starts one)");
            return None;
        };
        let mut w = World::sqlite(name);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let db = format!("cairn_e2e_{}_{}_{n}", name.replace('-', "_"), std::process::id());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(connection);
            client.batch_execute(&format!("DROP DATABASE IF EXISTS {db}")).await.expect("drop database");
            client.batch_execute(&format!("CREATE DATABASE {db}")).await.expect("create database");
        });
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b).to_string();
        w.db = PathBuf::from(format!("{base}/{db}"));
        Some(w)
    }

    /// Everything the database holds, as bytes to search: the SQLite file
    /// and its WAL, or a `pg_dump` of the PostgreSQL database.
    pub fn database_bytes(&self) -> Vec<u8> {
        if self.is_postgres() {
            let bin = std::fs::read_dir("/usr/lib/postgresql")
                .expect("PostgreSQL's binaries")
                .filter_map(|e| e.ok().map(|e| e.path().join("bin/pg_dump")))
                .filter(|p| p.exists())
                .max()
                .expect("pg_dump");
            let out = Command::new(bin).arg(&self.db).output().expect("pg_dump runs");
            assert!(out.status.success(), "pg_dump: {}", text(&out.stderr));
            return out.stdout;
        }
        let mut bytes = std::fs::read(&self.db).expect("the database file");
        bytes.extend(std::fs::read(format!("{}-wal", self.db.display())).unwrap_or_default());
        bytes
    }

    /// Whether the world's database is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.db.to_str().is_some_and(|d| d.starts_with("postgres://"))
    }

    /// A subdirectory of the scratch directory (created).
    pub fn subdir(&self, name: &str) -> PathBuf {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).expect("subdir");
        d
    }

    /// `cairn --db <db> ARGS`, with the test cache and no inherited CAIRN_* settings.
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_on(self.db.as_os_str(), args)
    }

    /// `cmd` with another `--db` (the same database through a proxy, say).
    pub fn cmd_on(&self, db: &std::ffi::OsStr, args: &[&str]) -> Command {
        let mut c = Command::new(cairn_bin());
        c.env_remove("CAIRN_DB").env_remove("CAIRN_DURABILITY");
        c.env("CAIRN_CACHE_DIR", target_dir().join("e2e-cache"));
        if matrix_postgres() {
            c.env("CAIRN_LEASE", MATRIX_LEASE.as_secs_f64().to_string());
        }
        c.arg("--db").arg(db).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Run to completion and capture.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("cairn runs")
    }

    /// Start in the background, output captured to files in the scratch dir.
    pub fn spawn(&self, args: &[&str], tag: &str) -> Child {
        let out = std::fs::File::create(self.dir.join(format!("{tag}.stdout"))).unwrap();
        let err = std::fs::File::create(self.dir.join(format!("{tag}.stderr"))).unwrap();
        let child = self.cmd(args).stdout(out).stderr(err).spawn().expect("cairn starts");
        self.spawned.lock().unwrap_or_else(|p| p.into_inner()).push(child.id());
        child
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// `cairn show ID --json`, parsed.
    pub fn show(&self, id: &str) -> serde_json::Value {
        let out = self.run(&["show", id, "--json"]);
        assert!(out.status.success(), "show {id} failed: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("show --json prints JSON")
    }

    /// `cairn show ID --json`, or None if there is no such run (yet).
    pub fn try_show(&self, id: &str) -> Option<serde_json::Value> {
        let out = self.run(&["show", id, "--json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("show --json prints JSON"))
    }

    /// `cairn runs --json`, parsed; none while no process has created the
    /// database yet (`cairn runs` refuses a path with no database).
    pub fn runs(&self) -> Vec<serde_json::Value> {
        if !self.is_postgres() && !self.db.exists() {
            return Vec::new();
        }
        let out = self.run(&["runs", "--json"]);
        assert!(out.status.success(), "runs failed: {}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .expect("runs --json prints JSON")
            .as_array()
            .expect("an array")
            .clone()
    }
}

/// A passing test leaves nothing behind; a failing one keeps its world for
/// inspection.
impl Drop for World {
    fn drop(&mut self) {
        for pid in self.spawned.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            // Only if that pid is still a cairn process (not reaped and reused).
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.windows(5).any(|w| w == b"cairn") {
                // SAFETY: a plain syscall.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// stdout of a successful command, as JSON.
pub fn json_stdout(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "command failed ({:?}): {}", out.status, text(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {:?}", text(&out.stdout)))
}

/// Poll `cond` every few milliseconds until it holds; panic after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Lines in a file (0 if it does not exist).
pub fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

/// SIGKILL a child and reap it.
pub fn kill9(child: &mut Child) {
    // SAFETY: plain syscall on a pid we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let status = child.wait().expect("reap");
    assert!(!status.success(), "the child was expected to die from SIGKILL, it exited: {status:?}");
    // On PostgreSQL a dead process's runs are taken over when its leases
    // expire (on SQLite the OS releases its locks at once): what the
    // suites do next after a kill needs that.
    if matrix_postgres() {
        std::thread::sleep(MATRIX_LEASE + Duration::from_millis(200));
    }
}

/// The lease of the matrix's PostgreSQL runs (`CAIRN_LEASE`).
const MATRIX_LEASE: Duration = Duration::from_secs(1);

/// Whether this is the PostgreSQL pass of the test matrix.
fn matrix_postgres() -> bool {
    std::env::var("CAIRN_E2E_BACKEND").as_deref() == Ok("postgres")
}

/// Exit code `code`, no panic, and every needle in stderr; the stderr.
pub fn assert_fails(out: &Output, code: i32, needles: &[&str]) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "expected exit {code}; stderr: {err}");
    assert!(!err.contains("panicked"), "a panic is not an error message: {err}");
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in: {err}");
    }
    err
}

/// A module written in WAT, compiled into the world's directory; its path.
pub fn wasm_file(w: &World, name: &str, wat: &str) -> String {
    let path = w.dir.join(name);
    std::fs::write(&path, wat::parse_str(wat).expect("valid WAT")).unwrap();
    path.display().to_string()
}

/// The project's fake payment service (`fake-payments`), on a free
/// loopback port; it exits when dropped (its stdin closes).
pub struct FakePayments {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl FakePayments {
    pub fn start(extra: &[&str]) -> FakePayments {
        use std::io::BufRead as _;
        let bin = cairn_bin().with_file_name("fake-payments");
        let mut child = Command::new(&bin)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start: {e}", bin.display()));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("its URL");
        FakePayments { child, url: line.trim().to_string() }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port")
    }

    /// `GET /stats`: requests per idempotency key, charges, refunds.
    pub fn stats(&self) -> serde_json::Value {
        let body = ureq::get(&format!("{}/stats", self.url)).call().expect("stats").into_string().expect("text");
        serde_json::from_str(&body).expect("JSON")
    }
}

impl Drop for FakePayments {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
