//! Parallel branches: `spawn` records the branch and starts it (fork by
//! replay, see `runtime::branch`), or, in the branch's own instance, lets
//! its closure run; `join` waits for outcomes.

use wasmtime::Caller;

use super::memory::{guest_bytes, guest_str};
use super::state::HostState;
use crate::model::{Entry, EntryKind};
use crate::runtime::branch::{BranchKey, BranchLaunch};
use cairn_abi::{RetryPolicy, SPAWN_HANDLE, SPAWN_RUN_HERE};

/// Start a parallel branch. In the parent: record the `spawn` (durable,
/// with the reads before it, since the branch's closure may use them) and
/// start the branch unless it has an outcome; answer a handle. In a branch
/// instance that reaches its own spawn: answer "run the closure here".
pub(super) async fn spawn(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    policy_ptr: i32,
    policy_len: i32,
) -> wasmtime::Result<i64> {
    caller.data_mut().durable()?;
    let name = guest_str(caller, ptr, len)?;
    let policy_bytes = guest_bytes(caller, policy_ptr, policy_len)?;
    let st = caller.data_mut();
    if st.live_step.is_some() {
        return Err(st.abi_error(format!("spawn of \"{name}\" inside a step; branches cannot nest")));
    }
    let policy = match RetryPolicy::decode(&policy_bytes) {
        Ok(p) => p,
        Err(e) => return Err(st.abi_error(format!("branch \"{name}\": {e}"))),
    };
    let (occurrence, replayed) = match st.journal.begin_spawn(&st.run.run_id, &name) {
        Ok(r) => r,
        Err(nd) => return Err(st.diverged(nd)),
    };
    st.spawns += 1;
    if st.spawns > st.limits.max_branches {
        let message =
            format!("limit `--max-branches` exceeded: the run spawns more than {} branches", st.limits.max_branches);
        return Err(st.run_limit(message));
    }
    let key: BranchKey = (name, occurrence);
    if let Some(mode) = st.branch_mode.clone() {
        if mode.key != key {
            if !replayed {
                return Err(st.abi_error(format!("branch {:?} never reached its spawn", mode.key)));
            }
            st.handles.push(key);
            return Ok((SPAWN_HANDLE << 32) | (st.handles.len() - 1) as i64);
        }
        st.sync_replaying();
        let staged = st.start_live(key.0, key.1, mode.attempt, policy);
        return Ok(((mode.attempt as i64) << 40) | (SPAWN_RUN_HERE << 32) | staged);
    }
    if !replayed {
        st.record(Entry::event(EntryKind::Spawn, key.0.clone(), key.1, Vec::new()))?;
        st.commit(Vec::new()).await?;
    }
    let st = caller.data_mut();
    st.sync_replaying();
    // New, or unfinished when the host last stopped: (re)start it.
    if st.branches.board.claim(&key) {
        let history = st.journal.entries()[..st.journal.cursor()].to_vec();
        let branches = st.branches.clone();
        branches.launcher.launch(BranchLaunch { key: key.clone(), history, policy, branches: branches.clone() });
    }
    st.handles.push(key);
    Ok((SPAWN_HANDLE << 32) | (st.handles.len() - 1) as i64)
}

/// Wait for the branches behind `count` u32 handles at `ptr`; stage their
/// outcomes in handle order, each as status u8 (0 value, 1 error), length
/// u32 little-endian, bytes.
pub(super) async fn join(caller: &mut Caller<'_, HostState>, ptr: i32, count: i32) -> wasmtime::Result<i64> {
    // Not a durable point: a join commits nothing (`join(0, 0)` in a loop
    // must not restart the CPU budget).
    caller.data_mut().enter()?;
    let raw = guest_bytes(caller, ptr, count.saturating_mul(4))?;
    let st = caller.data_mut();
    if st.live_step.is_some() {
        return Err(st.abi_error("join inside a step"));
    }
    let mut keys = Vec::with_capacity(raw.len() / 4);
    for h in raw.chunks_exact(4) {
        let h = u32::from_le_bytes(h.try_into().expect("4 bytes")) as usize;
        match st.handles.get(h) {
            // Each branch once: a handle repeated would copy its output again.
            Some(k) if keys.contains(k) => return Err(st.abi_error(format!("join: branch handle {h} given twice"))),
            Some(k) => keys.push(k.clone()),
            None => return Err(st.abi_error(format!("join: no branch handle {h}"))),
        }
    }
    let (board, watch) = (st.branches.board.clone(), st.watch.clone());
    let outcomes = loop {
        let changed = board.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let got: Option<Vec<_>> = keys.iter().map(|k| board.outcome(k)).collect();
        if let Some(got) = got {
            break got;
        }
        tokio::select! {
            _ = changed => {}
            _ = watch.changed() => caller.data_mut().enter()?,
        }
    };
    // The guest must take all of it into its memory: more than its memory
    // can hold is refused before anything is copied.
    let total: usize = outcomes.iter().map(|o| 5 + o.as_ref().map_or_else(String::len, Vec::len)).sum();
    let room = caller.data().memory.map_or(0, |m| m.data_size(&*caller));
    if total > room {
        let what = format!("join: the outcomes take {total} bytes, more than the guest's memory ({room} bytes)");
        return Err(caller.data_mut().abi_error(what));
    }
    let mut staged = Vec::with_capacity(total);
    for outcome in outcomes {
        let (status, bytes) = match outcome {
            Ok(v) => (0u8, v),
            Err(e) => (1u8, e.into_bytes()),
        };
        staged.push(status);
        staged.extend((bytes.len() as u32).to_le_bytes());
        staged.extend(bytes);
    }
    let st = caller.data_mut();
    st.staged = staged;
    Ok(st.staged.len() as i64)
}
