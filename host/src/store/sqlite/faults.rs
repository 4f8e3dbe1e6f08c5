//! A fault-injecting SQLite VFS, for tests: it wraps the default VFS and,
//! when `CAIRN_TEST_FAULTS` asks for it, fails writes or syncs of the
//! database's files the way a failing disk does. Nothing is mounted, so
//! tests need no privileges. Without the variable it is not even
//! registered, and connections use the default VFS.
//!
//! `CAIRN_TEST_FAULTS=KIND:N`: after N successful calls, each later one fails:
//! - `full`: writes fail with `SQLITE_FULL` (the disk is full);
//! - `short`: one write writes half its bytes and fails with `SQLITE_FULL`
//!   (what the unix VFS reports for a short write), then writes work again;
//! - `readonly`: writes fail with `SQLITE_READONLY`;
//! - `fsync`: syncs fail with `SQLITE_IOERR_FSYNC`.
//!
//! `CAIRN_TEST_FAULTS_CLEAR=FILE`: while FILE exists, the fault is cleared
//! (a test lifts a full disk without restarting the process).

use std::ffi::{CStr, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use rusqlite::ffi;

/// The name connections ask for when faults are planned.
pub const VFS_NAME: &str = "cairn-faults";
const VFS_NAME_C: &CStr = c"cairn-faults";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Full,
    Short,
    ReadOnly,
    Fsync,
}

#[derive(Debug)]
struct Plan {
    kind: Kind,
    after: u64,
    clear_when: Option<std::path::PathBuf>,
}

static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
static WRITES: AtomicU64 = AtomicU64::new(0);
static SYNCS: AtomicU64 = AtomicU64::new(0);
static SHORT_DONE: AtomicBool = AtomicBool::new(false);
/// The VFS this one wraps (the default one), set once at registration.
static INNER: OnceLock<usize> = OnceLock::new();

fn plan() -> Option<&'static Plan> {
    PLAN.get_or_init(|| {
        let spec = std::env::var("CAIRN_TEST_FAULTS").ok()?;
        let (kind, after) = spec.split_once(':')?;
        let kind = match kind {
            "full" => Kind::Full,
            "short" => Kind::Short,
            "readonly" => Kind::ReadOnly,
            "fsync" => Kind::Fsync,
            _ => return None,
        };
        let clear_when = std::env::var_os("CAIRN_TEST_FAULTS_CLEAR").map(Into::into);
        Some(Plan { kind, after: after.parse().ok()?, clear_when })
    })
    .as_ref()
}

fn cleared(plan: &Plan) -> bool {
    plan.clear_when.as_ref().is_some_and(|p| p.exists())
}

/// Register the VFS if faults are planned; the name to open connections
/// with, or `None` for the default VFS.
pub fn vfs() -> Option<&'static str> {
    plan()?;
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        // SAFETY: plain SQLite calls; the VFS struct is leaked and lives
        // for the process, as SQLite requires of a registered VFS.
        unsafe {
            let inner = ffi::sqlite3_vfs_find(std::ptr::null());
            if inner.is_null() {
                return false;
            }
            let _ = INNER.set(inner as usize);
            let mut vfs: ffi::sqlite3_vfs = *inner;
            vfs.zName = VFS_NAME_C.as_ptr();
            vfs.pNext = std::ptr::null_mut();
            vfs.xOpen = Some(x_open);
            ffi::sqlite3_vfs_register(Box::into_raw(Box::new(vfs)), 0) == ffi::SQLITE_OK
        }
    });
    ok.then_some(VFS_NAME)
}

/// An io-methods table of the wrapped VFS with writes and syncs replaced;
/// `original` is the table it copies (the file struct stays the wrapped
/// VFS's own, so every other method works on it unchanged).
#[repr(C)]
struct Methods {
    table: ffi::sqlite3_io_methods,
    original: *const ffi::sqlite3_io_methods,
}

// SAFETY: the tables are immutable once made and point at SQLite's static tables.
unsafe impl Send for Methods {}
unsafe impl Sync for Methods {}

static TABLES: Mutex<Vec<(usize, &'static Methods)>> = Mutex::new(Vec::new());

fn wrapped(original: *const ffi::sqlite3_io_methods) -> *const ffi::sqlite3_io_methods {
    let mut tables = TABLES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, m)) = tables.iter().find(|(o, _)| *o == original as usize) {
        return &m.table;
    }
    // SAFETY: `original` is a live, static io-methods table of SQLite.
    let mut table = unsafe { *original };
    table.xWrite = Some(x_write);
    table.xSync = Some(x_sync);
    let methods: &'static Methods = Box::leak(Box::new(Methods { table, original }));
    tables.push((original as usize, methods));
    &methods.table
}

/// # Safety
/// Called by SQLite with a file whose methods are one of our tables.
unsafe fn original(file: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: `pMethods` points at `Methods::table`, its first field.
    unsafe { &*(*((*file).pMethods as *const Methods)).original }
}

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let Some(&inner) = INNER.get() else { return ffi::SQLITE_ERROR };
    let inner = inner as *mut ffi::sqlite3_vfs;
    // SAFETY: forwarding SQLite's own arguments to the wrapped VFS, whose
    // file size this VFS declares as its own.
    unsafe {
        let Some(open) = (*inner).xOpen else { return ffi::SQLITE_ERROR };
        let rc = open(inner, name, file, flags, out_flags);
        if rc == ffi::SQLITE_OK && !(*file).pMethods.is_null() {
            (*file).pMethods = wrapped((*file).pMethods);
        }
        rc
    }
}

unsafe extern "C" fn x_write(file: *mut ffi::sqlite3_file, buf: *const c_void, amount: c_int, offset: i64) -> c_int {
    // SAFETY: SQLite's arguments, forwarded to the wrapped method.
    let write = unsafe { original(file) }.xWrite.expect("a file can be written");
    if let Some(plan) = plan()
        && plan.kind != Kind::Fsync
        && !cleared(plan)
        && WRITES.fetch_add(1, Ordering::Relaxed) >= plan.after
    {
        match plan.kind {
            Kind::Full => return ffi::SQLITE_FULL,
            Kind::ReadOnly => return ffi::SQLITE_READONLY,
            Kind::Short if !SHORT_DONE.swap(true, Ordering::Relaxed) => {
                // SAFETY: as below, with fewer bytes of the same buffer.
                unsafe { write(file, buf, amount / 2, offset) };
                return ffi::SQLITE_FULL;
            }
            _ => {}
        }
    }
    // SAFETY: SQLite's arguments, forwarded.
    unsafe { write(file, buf, amount, offset) }
}

unsafe extern "C" fn x_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: SQLite's arguments, forwarded to the wrapped method.
    let sync = unsafe { original(file) }.xSync.expect("a file can be synced");
    if let Some(plan) = plan()
        && plan.kind == Kind::Fsync
        && !cleared(plan)
        && SYNCS.fetch_add(1, Ordering::Relaxed) >= plan.after
    {
        return ffi::SQLITE_IOERR_FSYNC;
    }
    // SAFETY: SQLite's arguments, forwarded.
    unsafe { sync(file, flags) }
}
