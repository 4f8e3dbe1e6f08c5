//! Leases on SQLite: exactly one executor per run, with instant takeover
//! after a crash.
//!
//! One lock file beside the database; a run is held by locking one byte at
//! the offset of its (never reused) run key with an open-file-
//! description lock (`F_OFD_SETLK`). The kernel drops the lock the moment
//! the holding process dies, so `cairn resume` right after `kill -9` can
//! start at once, while a live executor is still detected reliably. One
//! descriptor serves every run of the process, and nothing needs cleaning up.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use crate::model::RunKey;
use crate::store::Lease;

/// The lock file of one database, opened once per process.
#[derive(Debug, Clone)]
pub struct LockFile {
    file: Arc<File>,
}

impl LockFile {
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
        Ok(LockFile { file: Arc::new(file) })
    }

    fn fcntl(&self, cmd: libc::c_int, kind: libc::c_short, offset: i64) -> io::Result<()> {
        // SAFETY: `flock` is a plain C struct; zeroed is a valid value and we
        // set every field the call reads.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = offset;
        fl.l_len = 1;
        fl.l_pid = 0; // required for OFD locks
        // SAFETY: valid fd owned by `self.file`, valid pointer to `fl`.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), cmd, &mut fl) };
        if rc == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Take the lock of a run, as its lease; `Ok(None)` if another process
    /// holds it. The kernel gives fencing for free (a holder is alive), so
    /// the epoch stays 0.
    pub fn try_lock(&self, run: RunKey) -> io::Result<Option<Lease>> {
        match self.fcntl(libc::F_OFD_SETLK, libc::F_WRLCK as libc::c_short, run.0) {
            Ok(()) => Ok(Some(Lease::new(run, 0, Box::new(RunLock { file: self.clone(), seq: run.0 })))),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A held run lock; released when dropped (or when the process dies).
#[derive(Debug)]
struct RunLock {
    file: LockFile,
    seq: i64,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = self.file.fcntl(libc::F_OFD_SETLK, libc::F_UNLCK as libc::c_short, self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_description_is_refused_until_release() {
        let path = std::env::temp_dir().join(format!("cairn-lock-test-{}", std::process::id()));
        let a = LockFile::open(&path).unwrap();
        let b = LockFile::open(&path).unwrap();
        let held = a.try_lock(RunKey(7)).unwrap().expect("first lock");
        assert!(b.try_lock(RunKey(7)).unwrap().is_none(), "second holder must be refused");
        assert!(b.try_lock(RunKey(8)).unwrap().is_some(), "other runs are independent");
        drop(held);
        assert!(b.try_lock(RunKey(7)).unwrap().is_some(), "released on drop");
        let _ = std::fs::remove_file(path);
    }
}
