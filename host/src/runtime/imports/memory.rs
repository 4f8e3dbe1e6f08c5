//! Guest memory, read and written only through bounds-checked ranges: a bad
//! pointer or length from the guest is ABI misuse, never a host fault.

use wasmtime::Caller;

use super::HostState;

/// A copy of the guest's bytes at `ptr..ptr+len`.
pub(super) fn guest_bytes(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<Vec<u8>> {
    let Some(memory) = caller.data().memory else {
        return Err(caller.data_mut().abi_error("the module exports no memory"));
    };
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    match memory.data(&caller).get(start..start.saturating_add(len)) {
        Some(bytes) => Ok(bytes.to_vec()),
        None => Err(caller.data_mut().abi_error(format!("buffer {start}+{len} is outside guest memory"))),
    }
}

/// The guest's UTF-8 string at `ptr..ptr+len`.
/// The longest name (of a step, a branch, a signal) a guest may use.
pub(super) const MAX_NAME_BYTES: usize = 4096;

/// A payload of the guest's (`what`: a step's output, the result), within
/// `--max-payload-mib` before anything is copied.
pub(super) fn guest_payload(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    what: &str,
) -> wasmtime::Result<Vec<u8>> {
    caller.data_mut().check_payload(len as u32 as usize, what)?;
    guest_bytes(caller, ptr, len)
}

/// The guest's UTF-8 name at `ptr..ptr+len`, at most [`MAX_NAME_BYTES`].
pub(super) fn guest_str(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<String> {
    if len as u32 as usize > MAX_NAME_BYTES {
        return Err(caller
            .data_mut()
            .abi_error(format!("a name of {} bytes is longer than {MAX_NAME_BYTES}", len as u32)));
    }
    let bytes = guest_bytes(caller, ptr, len)?;
    String::from_utf8(bytes).map_err(|_| caller.data_mut().abi_error("a name is not valid UTF-8"))
}

/// Write `bytes` at `ptr`; false if that is outside guest memory.
pub(super) fn write_guest(caller: &mut Caller<'_, HostState>, ptr: i32, bytes: &[u8]) -> bool {
    let Some(memory) = caller.data().memory else {
        return false;
    };
    memory.write(caller, ptr as u32 as usize, bytes).is_ok()
}
