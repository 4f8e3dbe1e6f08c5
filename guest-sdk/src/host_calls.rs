//! The raw host imports (`docs/abi.md`), and thin safe wrappers over them.

/// The ABI version this SDK speaks; the host asks for it before running.
pub use cairn_abi::ABI_VERSION;
use cairn_abi::{
    CANCELLED, EFFECT_FAILED, EFFECT_REFUSED, HTTP_RESPONSE, KV_ABSENT, KV_VALUE, SIGNAL_RECEIVED, SIGNAL_TIMED_OUT,
    SPAWN_HANDLE, SPAWN_RUN_HERE, STEP_MEMOIZED_ERR, STEP_MEMOIZED_OK, STEP_RUN,
};

use crate::Error;

/// Exported so the host can check which ABI the module was built for.
#[unsafe(no_mangle)]
pub extern "C" fn cairn_abi_version() -> i32 {
    ABI_VERSION
}

#[cfg(target_arch = "wasm32")]
mod imports {
    #[link(wasm_import_module = "cairn")]
    unsafe extern "C" {
        #[link_name = "input"]
        pub fn input() -> i32;
        #[link_name = "take"]
        pub fn take(ptr: *mut u8, len: i32) -> i32;
        #[link_name = "step_begin"]
        pub fn step_begin(name_ptr: *const u8, name_len: i32, policy_ptr: *const u8, policy_len: i32) -> i64;
        #[link_name = "sleep"]
        pub fn sleep(millis: i64) -> i32;
        #[link_name = "spawn"]
        pub fn spawn(name_ptr: *const u8, name_len: i32, policy_ptr: *const u8, policy_len: i32) -> i64;
        #[link_name = "join"]
        pub fn join(handles_ptr: *const u32, count: i32) -> i64;
        #[link_name = "signal_wait"]
        pub fn signal_wait(name_ptr: *const u8, name_len: i32, timeout_ms: i64) -> i64;
        #[link_name = "step_end"]
        pub fn step_end(status: i32, ptr: *const u8, len: i32) -> i32;
        #[link_name = "finish"]
        pub fn finish(status: i32, ptr: *const u8, len: i32) -> i32;
        #[link_name = "panic"]
        pub fn panic(ptr: *const u8, len: i32);
        #[link_name = "http"]
        pub fn http(ptr: *const u8, len: i32) -> i64;
        #[link_name = "kv_get"]
        pub fn kv_get(key_ptr: *const u8, key_len: i32) -> i64;
        #[link_name = "kv_put"]
        pub fn kv_put(key_ptr: *const u8, key_len: i32, value_ptr: *const u8, value_len: i32) -> i64;
        #[link_name = "kv_delete"]
        pub fn kv_delete(key_ptr: *const u8, key_len: i32) -> i64;
    }
}

/// Outside wasm there is no host: a workflow runs only inside `cairn`.
#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::missing_safety_doc)]
mod imports {
    const NO_HOST: &str = "cairn-sdk workflows run inside the cairn host: build for wasm32-wasip1";
    pub unsafe fn input() -> i32 {
        panic!("{NO_HOST}")
    }
    pub unsafe fn take(_: *mut u8, _: i32) -> i32 {
        panic!("{NO_HOST}")
    }
    pub unsafe fn step_begin(_: *const u8, _: i32, _: *const u8, _: i32) -> i64 {
        panic!("{NO_HOST}")
    }
    pub unsafe fn sleep(_: i64) -> i32 {
        panic!("{NO_HOST}")
    }
    pub unsafe fn signal_wait(_: *const u8, _: i32, _: i64) -> i64 {
        panic!("{NO_HOST}")
    }
    pub unsafe fn spawn(_: *const u8, _: i32, _: *const u8, _: i32) -> i64 {
        panic!("{NO_HOST}")
    }
    pub unsafe fn join(_: *const u32, _: i32) -> i64 {
        panic!("{NO_HOST}")
    }
    pub unsafe fn step_end(_: i32, _: *const u8, _: i32) -> i32 {
        panic!("{NO_HOST}")
    }
    pub unsafe fn finish(_: i32, _: *const u8, _: i32) -> i32 {
        panic!("{NO_HOST}")
    }
    pub unsafe fn panic(_: *const u8, _: i32) {}
    pub unsafe fn http(_: *const u8, _: i32) -> i64 {
        panic!("{NO_HOST}")
    }
    pub unsafe fn kv_get(_: *const u8, _: i32) -> i64 {
        panic!("{NO_HOST}")
    }
    pub unsafe fn kv_put(_: *const u8, _: i32, _: *const u8, _: i32) -> i64 {
        panic!("{NO_HOST}")
    }
    pub unsafe fn kv_delete(_: *const u8, _: i32) -> i64 {
        panic!("{NO_HOST}")
    }
}

/// Copy the `len` bytes the host staged into a new buffer.
fn take(len: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(len);
    // SAFETY: the buffer has room for `len` bytes; the host writes exactly
    // `len` bytes (or traps), so they are initialized afterwards.
    unsafe {
        take_into(buf.as_mut_ptr(), len);
        buf.set_len(len);
    }
    buf
}

unsafe fn take_into(ptr: *mut u8, len: usize) {
    // SAFETY: forwarded from `take`.
    unsafe { imports::take(ptr, len as i32) };
}

pub(crate) fn input() -> Vec<u8> {
    // SAFETY: no pointers.
    let len = unsafe { imports::input() };
    take(len as usize)
}

pub(crate) enum Begin {
    Memoized(Result<Vec<u8>, String>),
    Run {
        key: String,
        attempt: u32,
    },
    /// The run was cancelled with a grace period (delivered once).
    Cancelled(String),
}

pub(crate) fn step_begin(name: &str, policy: &[u8; cairn_abi::POLICY_BYTES]) -> Begin {
    // SAFETY: the host only reads the buffers for the duration of the call.
    let r = unsafe { imports::step_begin(name.as_ptr(), name.len() as i32, policy.as_ptr(), policy.len() as i32) };
    let len = (r & 0xffff_ffff) as usize;
    let status = (r >> 32) & 0xff;
    let attempt = (r >> 40) as u32;
    let bytes = take(len);
    match status {
        STEP_MEMOIZED_OK => Begin::Memoized(Ok(bytes)),
        STEP_MEMOIZED_ERR => Begin::Memoized(Err(String::from_utf8_lossy(&bytes).into_owned())),
        // The key is hex: the bytes are taken as they are, not copied.
        STEP_RUN => Begin::Run {
            key: String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            attempt,
        },
        CANCELLED => Begin::Cancelled(String::from_utf8_lossy(&bytes).into_owned()),
        other => panic!("cairn host answered step_begin with unknown status {other}"),
    }
}

/// `Err((message, permanent))`.
pub(crate) fn step_end(outcome: Result<&[u8], (&str, bool)>) {
    let (status, bytes) = match outcome {
        Ok(value) => (0, value),
        Err((message, false)) => (1, message.as_bytes()),
        Err((message, true)) => (2, message.as_bytes()),
    };
    // SAFETY: the host reads the buffer during the call only.
    unsafe { imports::step_end(status, bytes.as_ptr(), bytes.len() as i32) };
}

pub(crate) fn finish(outcome: Result<&[u8], &str>) {
    let (status, bytes) = match outcome {
        Ok(value) => (0, value),
        Err(message) => (1, message.as_bytes()),
    };
    // SAFETY: the host reads the buffer during the call only.
    unsafe { imports::finish(status, bytes.as_ptr(), bytes.len() as i32) };
}

/// False if the run was cancelled (with a grace period) instead.
pub(crate) fn sleep(millis: i64) -> bool {
    // SAFETY: no pointers.
    unsafe { imports::sleep(millis) != CANCELLED as i32 }
}

pub(crate) enum Spawned {
    Handle(u32),
    /// This instance exists to run the branch's closure.
    RunHere {
        key: String,
        attempt: u32,
    },
}

pub(crate) fn spawn(name: &str, policy: &[u8; cairn_abi::POLICY_BYTES]) -> Spawned {
    // SAFETY: the host only reads the buffers for the duration of the call.
    let r = unsafe { imports::spawn(name.as_ptr(), name.len() as i32, policy.as_ptr(), policy.len() as i32) };
    match (r >> 32) & 0xff {
        SPAWN_HANDLE => Spawned::Handle((r & 0xffff_ffff) as u32),
        SPAWN_RUN_HERE => {
            let key = take((r & 0xffff_ffff) as usize);
            Spawned::RunHere { key: String::from_utf8_lossy(&key).into_owned(), attempt: (r >> 40) as u32 }
        }
        other => panic!("cairn host answered spawn with unknown status {other}"),
    }
}

/// Outcomes of the branches behind `handles`, in order.
pub(crate) fn join(handles: &[u32]) -> Vec<Result<Vec<u8>, String>> {
    // SAFETY: the host reads the handles during the call only.
    let len = unsafe { imports::join(handles.as_ptr(), handles.len() as i32) };
    let bytes = take(len as usize);
    let mut out = Vec::with_capacity(handles.len());
    let mut rest = &bytes[..];
    while let [status, l0, l1, l2, l3, tail @ ..] = rest {
        let n = u32::from_le_bytes([*l0, *l1, *l2, *l3]) as usize;
        let (body, tail) = tail.split_at(n);
        out.push(if *status == 0 { Ok(body.to_vec()) } else { Err(String::from_utf8_lossy(body).into_owned()) });
        rest = tail;
    }
    out
}

/// The signal's payload, or `None` if the wait timed out; `Err` if the run
/// was cancelled (with a grace period) instead.
pub(crate) fn signal_wait(name: &str, timeout_ms: Option<i64>) -> Result<Option<Vec<u8>>, Error> {
    // SAFETY: the host reads `name` during the call only.
    let r = unsafe { imports::signal_wait(name.as_ptr(), name.len() as i32, timeout_ms.unwrap_or(-1)) };
    let len = (r & 0xffff_ffff) as usize;
    let payload = take(len);
    match (r >> 32) & 0xff {
        SIGNAL_RECEIVED => Ok(Some(payload)),
        SIGNAL_TIMED_OUT => Ok(None),
        CANCELLED => Err(Error::cancelled(String::from_utf8_lossy(&payload).into_owned())),
        other => panic!("cairn host answered signal_wait with unknown status {other}"),
    }
}

/// What an effect call (`http`, `kv_*`) answered: its status and payload,
/// or the error it reported.
fn effect(r: i64, call: &str) -> Result<(i64, Vec<u8>), Error> {
    let payload = take((r & 0xffff_ffff) as usize);
    match (r >> 32) & 0xff {
        EFFECT_FAILED => Err(Error::new(String::from_utf8_lossy(&payload).into_owned())),
        EFFECT_REFUSED => Err(Error::permanent(String::from_utf8_lossy(&payload).into_owned())),
        status @ (HTTP_RESPONSE | KV_ABSENT) => Ok((status, payload)),
        other => panic!("cairn host answered {call} with unknown status {other}"),
    }
}

pub(crate) fn http(request: &cairn_abi::HttpRequest) -> Result<cairn_abi::HttpResponse, Error> {
    let bytes = request.encode();
    // SAFETY: the host reads the buffer during the call only.
    let r = unsafe { imports::http(bytes.as_ptr(), bytes.len() as i32) };
    let (_, payload) = effect(r, "http")?;
    cairn_abi::HttpResponse::decode(&payload).map_err(Error::permanent)
}

pub(crate) fn kv_get(key: &str) -> Result<Option<Vec<u8>>, Error> {
    // SAFETY: the host reads the buffer during the call only.
    let r = unsafe { imports::kv_get(key.as_ptr(), key.len() as i32) };
    let (status, payload) = effect(r, "kv_get")?;
    Ok((status == KV_VALUE).then_some(payload))
}

pub(crate) fn kv_put(key: &str, value: &[u8]) -> Result<(), Error> {
    // SAFETY: the host reads the buffers during the call only.
    let r = unsafe { imports::kv_put(key.as_ptr(), key.len() as i32, value.as_ptr(), value.len() as i32) };
    effect(r, "kv_put").map(drop)
}

pub(crate) fn kv_delete(key: &str) -> Result<(), Error> {
    // SAFETY: the host reads the buffer during the call only.
    let r = unsafe { imports::kv_delete(key.as_ptr(), key.len() as i32) };
    effect(r, "kv_delete").map(drop)
}

pub(crate) fn report_panic(message: &str) {
    // SAFETY: the host reads the buffer during the call only.
    unsafe { imports::panic(message.as_ptr(), message.len() as i32) };
}
