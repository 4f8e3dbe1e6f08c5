//! `kv_get`, `kv_put`, `kv_delete`: key-value state committed with the
//! step. Reads see committed state plus the attempt's own writes; writes
//! are staged here and go into the same commit item as the step's outcome
//! (`HostState::attempt_write`), with the versions read, so that the item
//! fails whole if another run changed one of those keys meanwhile.

use std::collections::HashMap;

use cairn_abi::{EFFECT_FAILED, EFFECT_REFUSED, KV_ABSENT, KV_DONE, KV_VALUE};
use wasmtime::Caller;

use super::memory::guest_bytes;
use super::state::HostState;
use crate::store::KvCommit;

/// The longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// One step attempt's reads and staged writes.
#[derive(Debug, Default)]
pub struct KvAttempt {
    /// Versions seen, by key (the first read of each).
    reads: HashMap<String, u64>,
    /// Staged writes, last one per key wins; in first-write order.
    writes: Vec<(String, Option<Vec<u8>>)>,
    /// Where each key's write is in `writes`.
    index: HashMap<String, usize>,
    /// Bytes of keys and values staged (bounded: they wait in memory).
    bytes: usize,
}

impl KvAttempt {
    fn staged(&self, key: &str) -> Option<&Option<Vec<u8>>> {
        self.index.get(key).map(|&i| &self.writes[i].1)
    }

    /// Stage a write, unless the attempt would hold more than `max_keys`
    /// keys or `max_bytes` bytes staged: then the refusal's message.
    fn stage(&mut self, key: String, value: Option<Vec<u8>>, max_keys: u64, max_bytes: usize) -> Result<(), String> {
        let size = key.len() + value.as_ref().map_or(0, Vec::len);
        let old = self.index.get(&key).map_or(0, |&i| key.len() + self.writes[i].1.as_ref().map_or(0, Vec::len));
        let bytes = self.bytes - old + size;
        if bytes > max_bytes {
            return Err(format!("a step may stage at most {max_bytes} bytes of key-value writes (--max-history-mib)"));
        }
        match self.index.get(&key) {
            Some(&i) => self.writes[i].1 = value,
            None => {
                if self.writes.len() as u64 >= max_keys {
                    return Err(format!("a step may write at most {max_keys} keys (--max-kv-keys)"));
                }
                self.index.insert(key.clone(), self.writes.len());
                self.writes.push((key, value));
            }
        }
        self.bytes = bytes;
        Ok(())
    }

    /// What goes with the step's outcome: nothing if the attempt wrote
    /// nothing (a read-only attempt's value is as of its reads).
    pub fn into_commit(self, namespace: &str, max_keys: u64) -> Option<KvCommit> {
        if self.writes.is_empty() {
            return None;
        }
        Some(KvCommit {
            namespace: namespace.to_string(),
            reads: self.reads.into_iter().collect(),
            writes: self.writes,
            max_keys,
        })
    }
}

fn stage(st: &mut HostState, status: i64, bytes: Vec<u8>) -> i64 {
    st.staged = bytes;
    (status << 32) | st.staged.len() as i64
}

/// The key at `ptr`, checked; `Err(code)` is a refusal already staged.
fn key_of(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<Result<String, i64>> {
    caller.data_mut().enter()?;
    let st = caller.data_mut();
    if st.live_step.is_none() {
        let message = "the key-value store is usable only inside a step (ctx.step): its writes commit with the \
                       step's outcome, and workflow code between steps is replayed";
        return Ok(Err(stage(st, EFFECT_REFUSED, message.as_bytes().to_vec())));
    }
    let n = len as u32 as usize;
    if n == 0 || n > MAX_KEY_BYTES {
        let message = format!("a key-value key must be 1 to {MAX_KEY_BYTES} bytes, not {n}");
        return Ok(Err(stage(st, EFFECT_REFUSED, message.into_bytes())));
    }
    let bytes = guest_bytes(caller, ptr, len)?;
    match String::from_utf8(bytes) {
        Ok(key) => Ok(Ok(key)),
        Err(_) => Ok(Err(stage(caller.data_mut(), EFFECT_REFUSED, b"a key-value key must be UTF-8".to_vec()))),
    }
}

/// `kv_get(key) -> i64`: the value staged (`KV_VALUE`), or `KV_ABSENT`.
pub(super) async fn kv_get(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<i64> {
    let key = match key_of(caller, ptr, len)? {
        Ok(key) => key,
        Err(code) => return Ok(code),
    };
    let st = caller.data_mut();
    let attempt = st.kv.get_or_insert_with(Default::default);
    if let Some(staged) = attempt.staged(&key) {
        return Ok(match staged.clone() {
            Some(value) => stage(st, KV_VALUE, value),
            None => stage(st, KV_ABSENT, Vec::new()),
        });
    }
    let store = st.run.store.clone();
    let found = store.kv_get(&st.kv_namespace, &key).await;
    let st = caller.data_mut();
    st.enter()?;
    let found = match found {
        Ok(found) => found,
        Err(e) => return Ok(stage(st, EFFECT_FAILED, format!("key-value read of {key:?}: {e}").into_bytes())),
    };
    st.kv.get_or_insert_with(Default::default).reads.entry(key).or_insert(found.version);
    Ok(match found.value {
        Some(value) => stage(st, KV_VALUE, value),
        None => stage(st, KV_ABSENT, Vec::new()),
    })
}

/// `kv_put(key, value) -> i64`: staged with the step.
pub(super) fn kv_put(
    mut caller: Caller<'_, HostState>,
    key_ptr: i32,
    key_len: i32,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<i64> {
    let key = match key_of(&mut caller, key_ptr, key_len)? {
        Ok(key) => key,
        Err(code) => return Ok(code),
    };
    let st = caller.data_mut();
    let n = len as u32 as usize;
    if n > st.limits.max_payload_bytes() {
        let message = format!(
            "the value of key {key:?} is {n} bytes, more than the run's limit of {} MiB (--max-payload-mib)",
            st.limits.max_payload_mib
        );
        return Ok(stage(st, EFFECT_REFUSED, message.into_bytes()));
    }
    let value = guest_bytes(&mut caller, ptr, len)?;
    let st = caller.data_mut();
    // Operators read values as JSON (`cairn kv get`): keep them so.
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&value) {
        return Ok(stage(st, EFFECT_REFUSED, format!("the value of key {key:?} is not JSON: {e}").into_bytes()));
    }
    let (max_keys, max_bytes) = staging_limits(st);
    match st.kv.get_or_insert_with(Default::default).stage(key, Some(value), max_keys, max_bytes) {
        Ok(()) => Ok(stage(st, KV_DONE, Vec::new())),
        Err(message) => Ok(stage(st, EFFECT_REFUSED, message.into_bytes())),
    }
}

/// `kv_delete(key) -> i64`: staged with the step.
pub(super) fn kv_delete(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<i64> {
    let key = match key_of(&mut caller, ptr, len)? {
        Ok(key) => key,
        Err(code) => return Ok(code),
    };
    let st = caller.data_mut();
    let (max_keys, max_bytes) = staging_limits(st);
    match st.kv.get_or_insert_with(Default::default).stage(key, None, max_keys, max_bytes) {
        Ok(()) => Ok(stage(st, KV_DONE, Vec::new())),
        Err(message) => Ok(stage(st, EFFECT_REFUSED, message.into_bytes())),
    }
}

/// What one attempt may stage: the run's key limit, and its history's
/// size (the writes wait in memory, as the history does).
fn staging_limits(st: &HostState) -> (u64, usize) {
    let bytes = usize::try_from(st.limits.max_history_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    (st.limits.max_kv_keys, bytes)
}
