//! # cairn-sdk: durable workflows in plain Rust
//!
//! A Cairn workflow is an ordinary Rust program compiled to
//! `wasm32-wasip1` and run by the `cairn` host. Every step's outcome is
//! committed to the host's database before the workflow moves on; if the
//! host is killed, `cairn resume` replays the workflow from its history:
//! completed steps are not run again, and the workflow carries on where it
//! stopped.
//!
//! ## A workflow
//!
//! ```no_run
//! use cairn_sdk::{Ctx, Error};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Order { qty: u64 }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Charge { id: String }
//!
//! #[derive(Serialize)]
//! struct Receipt { price: u64, charge: Charge }
//!
//! fn main() {
//!     cairn_sdk::run(workflow)
//! }
//!
//! fn workflow(ctx: &mut Ctx, input: Order) -> Result<Receipt, Error> {
//!     let price: u64 = ctx.step("price", |_s| Ok(input.qty * 100))?;
//!     let charge: Charge = ctx.step("charge", |s| {
//!         // Hand the key to the payment provider: a retried or replayed
//!         // charge is then never taken twice.
//!         Ok(Charge { id: format!("ch_{}", s.idempotency_key()) })
//!     })?;
//!     Ok(Receipt { price, charge })
//! }
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip1` and run it
//! with `cairn run target/wasm32-wasip1/release/my_workflow.wasm --input '{"qty": 3}'`.
//!
//! ## What goes in a step, and what does not
//!
//! A step closure is where side effects belong: calls to other services,
//! writes to files in granted directories, reading the live clock. It runs
//! at most once per attempt; once its outcome (the value, or the error it
//! returned) is committed, it never runs again for this run.
//!
//! - **Do** pass [`Step::idempotency_key`] to every external service that
//!   accepts one. A step interrupted by a crash before its outcome was
//!   committed runs again on resume; the key makes that second call
//!   harmless.
//! - **Do** return everything the rest of the workflow needs from the
//!   closure. On replay the closure does not run and the recorded value is
//!   returned instead.
//! - **Don't** change state captured from the workflow inside a closure
//!   (pushing to a `Vec` declared outside, incrementing a counter): on
//!   replay the closure does not run, so the change would not happen and the
//!   workflow would continue with different state.
//! - **Don't** nest steps: a closure gets a [`Step`], not the [`Ctx`].
//!
//! ## Determinism between steps
//!
//! Workflow code outside step closures is replayed, so it must do the same
//! thing on every execution. Cairn makes the usual sources of difference
//! safe: `SystemTime::now()` and `Instant::now()` read between steps are
//! recorded on the first execution and returned from the history on
//! replay, and random numbers (including std's `HashMap` seeds) come from a
//! key drawn for each run, so every replay reads the same ones. Reads inside
//! a step closure are live and not recorded. Files and environment variables are
//! *not* recorded: if workflow code between steps reads a file and the file
//! changes before a resume, the replay may ask for different steps than the
//! history holds; the host then stops the run with a non-determinism error
//! and leaves its history untouched.
//!
//! Output printed with `println!`/`eprintln!` goes to the host's stderr on
//! the first execution and is suppressed while replaying.
//!
//! ## Effects: HTTP, key-value state, compensations
//!
//! Inside a step closure, [`Step::http`] calls other services and
//! [`Step::kv`] reads and writes the key-value store. What each promises:
//!
//! - **HTTP is at-least-once, always with the same key.** The host sends
//!   the request; a crash after the service answered and before the step
//!   committed sends it again on resume, with the same `Idempotency-Key`
//!   header (the step's key, unless you set your own). Services that honour
//!   the key (most payment APIs) then act once. The run reaches only the
//!   hosts it was started with (`--allow-http HOST[:PORT]`); anything else
//!   fails with a permanent error and is never sent. A network error or a
//!   timeout is an ordinary error, retried by the step's policy. Secrets go
//!   in by the host (`--http-header HOST:NAME=@env:VAR`), never through the
//!   workflow or the database.
//! - **Key-value writes are exactly-once.** They are staged during the
//!   attempt and committed in the same transaction as the step's outcome:
//!   a step that completes applies them once, a failed or crashed attempt
//!   applies nothing. Concurrent runs writing the same keys are isolated
//!   optimistically: if a key the attempt read changed before it commits,
//!   the attempt runs again at once, not counted as a retry. Values are
//!   JSON; the namespace is the module's unless the run was started with
//!   `--kv-namespace NS`.
//! - **Neither works between steps**, because workflow code there is
//!   replayed and a replay would repeat the call: outside a step closure
//!   they fail with a permanent error.
//! - **Compensations** ([`Ctx::step_with_compensation`],
//!   [`Ctx::compensate`]) undo completed steps in reverse order, each undo a
//!   durable step of its own. `cairn cancel RUN --grace SECONDS` hands the
//!   workflow an error it can handle ([`Error::is_cancelled`]) at its next
//!   step, sleep or signal wait, so it can compensate within the grace
//!   period; the run then ends `cancelled`.
//!
//! ## Errors and panics
//!
//! [`Error`] converts from the common error types, so `?` works in workflows
//! and in closures. A step closure that returns `Err` records that error as
//! the step's outcome. A panic (or a trap, or a limit hit) inside a step
//! records the attempt as failed and fails the run with the panic message; a
//! workflow that returns `Err` fails the run with that message. Failed runs
//! keep their history (`cairn show RUN_ID`).

mod error;
mod host_calls;
mod http;
mod kv;

use std::fmt::Display;
use std::marker::PhantomData;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use cairn_abi::RetryPolicy;
pub use error::Error;
pub use host_calls::ABI_VERSION;
pub use host_calls::cairn_abi_version;
pub use http::{Http, Request, Response};
pub use kv::Kv;

/// Run a workflow: read the run's input from the host, call `workflow`,
/// and hand its output (or its error's text) back to the host.
///
/// Call it from `main`, once: `fn main() { cairn_sdk::run(workflow) }`.
pub fn run<I, O, E>(workflow: impl FnOnce(&mut Ctx, I) -> Result<O, E>)
where
    I: DeserializeOwned,
    O: Serialize,
    E: Display,
{
    install_panic_hook();
    // std draws its per-thread HashMap keys lazily, on first use. Draw them
    // here, outside any step closure, so that they come from the run's own
    // random stream (the same on every replay): drawn first inside a closure
    // they would be fresh bytes, and HashMaps made later by workflow code
    // would iterate in another order on replay. (Runs created before run
    // keys record the draw at this fixed point of their history.)
    let _ = std::collections::hash_map::RandomState::new();

    let input: I = match serde_json::from_slice(&host_calls::input()) {
        Ok(input) => input,
        Err(e) => {
            host_calls::finish(Err(&format!("invalid input for this workflow: {e}")));
            return;
        }
    };
    let mut ctx = Ctx { undo: Vec::new() };
    match workflow(&mut ctx, input) {
        Ok(output) => match serde_json::to_vec(&output) {
            Ok(json) => host_calls::finish(Ok(&json)),
            Err(e) => host_calls::finish(Err(&format!("the workflow's output cannot be serialized as JSON: {e}"))),
        },
        Err(e) => host_calls::finish(Err(&e.to_string())),
    }
}

fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        host_calls::report_panic(&format!("workflow {info}"));
        default(info);
    }));
}

/// The workflow's handle on the host: durable steps.
pub struct Ctx {
    /// Compensations registered by [`Ctx::step_with_compensation`], oldest
    /// first. Rebuilt on every replay, because the steps that register
    /// them replay: durable without a write of their own.
    undo: Vec<(String, Undo)>,
}

type Undo = Box<dyn FnOnce(&Step) -> Result<(), Error>>;

impl Ctx {
    /// A durable step, retried under [`RetryPolicy::default()`].
    ///
    /// The first time, `f` runs and its outcome (value or error text) is
    /// committed to the database before `step` returns. On every replay the
    /// committed outcome is returned and `f` does not run.
    ///
    /// Steps are identified by `name` and occurrence: the same name called
    /// in a loop gets occurrences 1, 2, 3, ... Both the value returned live
    /// and the one returned on replay go through the recorded JSON, so they
    /// are always the same.
    ///
    /// An attempt that returns `Err` (unless [`Error::permanent`]), panics,
    /// traps or hits a limit is recorded and retried after a durable
    /// backoff; when no attempt is left, `step` returns the last error.
    pub fn step<T>(&mut self, name: &str, f: impl FnOnce(&Step) -> Result<T, Error>) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned,
    {
        self.step_with(name, RetryPolicy::default(), f)
    }

    /// [`Ctx::step`] with an explicit retry policy.
    ///
    /// ```no_run
    /// # use cairn_sdk::{Ctx, Error, RetryPolicy};
    /// # use std::time::Duration;
    /// # fn flow(ctx: &mut Ctx) -> Result<(), Error> {
    /// let policy = RetryPolicy::default()
    ///     .max_attempts(5)
    ///     .initial_backoff(Duration::from_millis(200))
    ///     .timeout(Duration::from_secs(10));
    /// let status: u16 = ctx.step_with("call_flaky_service", policy, |s| {
    ///     // ... pass s.idempotency_key() to the service ...
    ///     Ok(200)
    /// })?;
    /// # Ok(()) }
    /// ```
    ///
    /// A panic cannot be caught inside wasm and the closure is `FnOnce`, so
    /// each retry runs in a fresh instance that replays the workflow up to
    /// this step (completed steps come from the history) and runs the
    /// closure again. The backoff, jitter included, is committed as an
    /// absolute retry time: a crash during the backoff does not change it.
    pub fn step_with<T>(
        &mut self,
        name: &str,
        policy: RetryPolicy,
        f: impl FnOnce(&Step) -> Result<T, Error>,
    ) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned,
    {
        let decode = |bytes: &[u8]| {
            serde_json::from_slice::<T>(bytes).map_err(|e| {
                Error::new(format!("step \"{name}\": its recorded value does not fit the type asked for: {e}"))
            })
        };
        match host_calls::step_begin(name, &policy.encode()) {
            host_calls::Begin::Memoized(Ok(bytes)) => decode(&bytes),
            host_calls::Begin::Memoized(Err(message)) => Err(Error::new(message)),
            host_calls::Begin::Cancelled(message) => Err(Error::cancelled(message)),
            host_calls::Begin::Run { key, attempt } => {
                // With attempts left after an error, the host starts a fresh
                // instance and this call does not return.
                let json = run_closure(Step { name: name.to_string(), key, attempt }, f)?;
                decode(&json)
            }
        }
    }

    /// Start a parallel branch: a durable step that runs concurrently with
    /// other branches (and with the workflow until it joins them), under
    /// [`RetryPolicy::default()`].
    ///
    /// ```no_run
    /// # use cairn_sdk::{Ctx, Error};
    /// # fn flow(ctx: &mut Ctx) -> Result<(), Error> {
    /// let laptop = ctx.spawn("provision_laptop", |s| Ok(format!("LT-{}", &s.idempotency_key()[..6])))?;
    /// let access = ctx.spawn("grant_access", |_s| Ok(vec!["everyone".to_string()]))?;
    /// let (laptop, access): (String, Vec<String>) = ctx.join2(laptop, access)?;
    /// # Ok(()) }
    /// ```
    ///
    /// Each branch runs in its own sandboxed instance of the same module:
    /// the host starts a fresh instance that replays the workflow up to this
    /// `spawn` and runs the closure there. So the closure may capture
    /// anything the workflow computed, but workflow code before a `spawn`
    /// must be deterministic (it runs again in every branch instance; files
    /// and environment variables read between steps are not recorded).
    ///
    /// A branch is one step: its closure gets a [`Step`] and does its work
    /// without nested steps, sleeps or signals. Its outcome is memoized like
    /// a step's: after a crash, finished branches are not run again and
    /// unfinished ones are restarted. A branch that is never joined still
    /// runs to completion (the run finishes after it) and is recorded.
    pub fn spawn<T>(&mut self, name: &str, f: impl FnOnce(&Step) -> Result<T, Error>) -> Result<Branch<T>, Error>
    where
        T: Serialize + DeserializeOwned,
    {
        self.spawn_with(name, RetryPolicy::default(), f)
    }

    /// [`Ctx::spawn`] with an explicit retry policy.
    pub fn spawn_with<T>(
        &mut self,
        name: &str,
        policy: RetryPolicy,
        f: impl FnOnce(&Step) -> Result<T, Error>,
    ) -> Result<Branch<T>, Error>
    where
        T: Serialize + DeserializeOwned,
    {
        match host_calls::spawn(name, &policy.encode()) {
            host_calls::Spawned::Handle(handle) => Ok(Branch { handle, name: name.to_string(), _value: PhantomData }),
            host_calls::Spawned::RunHere { key, attempt } => {
                let _ = run_closure(Step { name: name.to_string(), key, attempt }, f);
                // The host ends a branch instance once its outcome is recorded.
                unreachable!("the cairn host did not end the branch instance")
            }
        }
    }

    /// Wait for two branches and return both values. If either failed
    /// (after its retries), returns the error of the first in spawn order;
    /// both outcomes stay memoized either way.
    pub fn join2<A, B>(&mut self, a: Branch<A>, b: Branch<B>) -> Result<(A, B), Error>
    where
        A: DeserializeOwned,
        B: DeserializeOwned,
    {
        let mut outcomes = host_calls::join(&[a.handle, b.handle]).into_iter();
        let (ra, rb) = (outcomes.next(), outcomes.next());
        let va = decode_branch::<A>(&a.name, ra);
        let vb = decode_branch::<B>(&b.name, rb);
        Ok((va?, vb?))
    }

    /// Wait for every branch given; their values in the order given. If any
    /// failed, returns the error of the first failed one in that order.
    pub fn join_all<T: DeserializeOwned>(&mut self, branches: Vec<Branch<T>>) -> Result<Vec<T>, Error> {
        let handles: Vec<u32> = branches.iter().map(|b| b.handle).collect();
        let outcomes = host_calls::join(&handles);
        branches.iter().zip(outcomes).map(|(b, o)| decode_branch::<T>(&b.name, Some(o))).collect()
    }

    /// A durable timer: the run sleeps for `duration`, counted from the
    /// first execution. The wake-up time is committed before the wait, so a
    /// host killed mid-sleep and resumed later wakes at the original time
    /// (at once, if that has passed). Long sleeps hold no memory: the run is
    /// dropped and replayed when it wakes.
    ///
    /// `std::thread::sleep` in workflow code is a durable timer too; inside
    /// a step closure it is an ordinary (live) sleep.
    ///
    /// Returns [`Error::is_cancelled`] if the run is cancelled with a grace
    /// period before (or while) it sleeps.
    pub fn sleep(&mut self, duration: Duration) -> Result<(), Error> {
        if host_calls::sleep(duration.as_millis().min(i64::MAX as u128) as i64) {
            Ok(())
        } else {
            Err(Error::cancelled("the run was cancelled while it slept".into()))
        }
    }

    /// Wait until the signal `name` is delivered (`cairn signal RUN_ID NAME
    /// [JSON]`) and return its payload.
    ///
    /// A signal sent before the run waits for it is kept; each signal is
    /// received once, in the order sent; receiving it is recorded in the
    /// history, so a replay gets the same payload without waiting. A long
    /// wait holds no memory: the run is dropped and replayed when the
    /// signal comes.
    pub fn wait_signal<T: DeserializeOwned>(&mut self, name: &str) -> Result<T, Error> {
        let payload = host_calls::signal_wait(name, None)?.unwrap_or_default();
        decode_signal(name, &payload)
    }

    /// [`Ctx::wait_signal`], giving up after `timeout` (counted from the
    /// first execution, like [`Ctx::sleep`]): `Ok(None)` if no signal came.
    pub fn wait_signal_timeout<T: DeserializeOwned>(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<T>, Error> {
        match host_calls::signal_wait(name, Some(timeout.as_millis().min(i64::MAX as u128) as i64))? {
            Some(payload) => decode_signal(name, &payload).map(Some),
            None => Ok(None),
        }
    }

    /// A step with a compensation: `f` runs as [`Ctx::step`] does; once it
    /// succeeds, `undo` (given the step's output) is registered, and
    /// [`Ctx::compensate`] runs it if the workflow later has to roll back.
    ///
    /// ```no_run
    /// # use cairn_sdk::{Ctx, Error};
    /// # fn flow(ctx: &mut Ctx) -> Result<(), Error> {
    /// let reservation: String = ctx.step_with_compensation(
    ///     "reserve",
    ///     |s| Ok(format!("res-{}", &s.idempotency_key()[..8])),
    ///     |_s, reservation: String| {
    ///         // release `reservation`: runs at most once, as a durable step
    ///         Ok(())
    ///     },
    /// )?;
    /// if let Err(e) = ctx.step("ship", |_s| -> Result<(), Error> { Err(Error::permanent("no courier")) }) {
    ///     ctx.compensate()?;
    ///     return Err(e);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// Registration is durable without a write of its own: it happens
    /// whenever the step returns `Ok`, live or replayed, so a replay after a
    /// crash registers the same undos in the same order. A step whose
    /// closure returned `Err` registers nothing.
    pub fn step_with_compensation<T, U>(
        &mut self,
        name: &str,
        f: impl FnOnce(&Step) -> Result<T, Error>,
        undo: U,
    ) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned + 'static,
        U: FnOnce(&Step, T) -> Result<(), Error> + 'static,
    {
        let value = self.step(name, f)?;
        // The undo gets its own copy of the value, through the same JSON
        // the step committed (no `Clone` asked of `T`).
        let copy: T = serde_json::from_slice(&serde_json::to_vec(&value)?)?;
        self.undo.push((name.to_string(), Box::new(move |s: &Step| undo(s, copy))));
        Ok(value)
    }

    /// Run the registered compensations, newest first, each as a durable
    /// step named `undo:NAME` under [`RetryPolicy::default()`], and forget
    /// them. Each runs at most once to completion, across crashes, like any
    /// step. If one fails for good the others still run; the first error is
    /// returned.
    pub fn compensate(&mut self) -> Result<(), Error> {
        let mut first_error = None;
        while let Some((name, undo)) = self.undo.pop() {
            let mut undo = Some(undo);
            let result = loop {
                let result = self.step(&format!("undo:{name}"), |s| undo.take().expect("an undo runs once")(s));
                match result {
                    // A cancellation delivered here (once) must not cost
                    // the undo: the closure did not run, so run it now.
                    Err(e) if e.is_cancelled() && undo.is_some() => first_error = first_error.or(Some(e)),
                    other => break other,
                }
            };
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Run a step's (or branch's) closure live and report its outcome to the
/// host; the value as the JSON that was committed.
fn run_closure<T: Serialize>(step: Step, f: impl FnOnce(&Step) -> Result<T, Error>) -> Result<Vec<u8>, Error> {
    match f(&step).and_then(|v| serde_json::to_vec(&v).map_err(Error::from)) {
        Ok(json) => {
            host_calls::step_end(Ok(&json));
            Ok(json)
        }
        Err(e) => {
            host_calls::step_end(Err((e.message(), e.is_permanent())));
            Err(e)
        }
    }
}

/// A parallel branch started by [`Ctx::spawn`]; redeem it with
/// [`Ctx::join2`] or [`Ctx::join_all`].
#[must_use = "a branch runs to completion anyway, but its value is only had through join"]
pub struct Branch<T> {
    handle: u32,
    name: String,
    _value: PhantomData<fn() -> T>,
}

fn decode_branch<T: DeserializeOwned>(name: &str, outcome: Option<Result<Vec<u8>, String>>) -> Result<T, Error> {
    match outcome {
        Some(Ok(bytes)) => serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(format!("branch \"{name}\": its recorded value does not fit the type asked for: {e}"))
        }),
        Some(Err(message)) => Err(Error::new(message)),
        None => Err(Error::new(format!("branch \"{name}\": the host returned no outcome"))),
    }
}

fn decode_signal<T: DeserializeOwned>(name: &str, payload: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(payload)
        .map_err(|e| Error::new(format!("signal \"{name}\": its payload does not fit the type asked for: {e}")))
}

/// What a step closure knows about the step it runs.
#[derive(Debug, Clone)]
pub struct Step {
    name: String,
    key: String,
    attempt: u32,
}

impl Step {
    /// A key that is stable across replays and crashes and unique per
    /// database, run, step name and occurrence: pass it to external services
    /// so that a repeated call is recognized as the same one.
    pub fn idempotency_key(&self) -> &str {
        &self.key
    }

    /// 1 for the first attempt of this step, 2 for the next, ...
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// HTTP requests sent by the host, to the hosts the run may reach
    /// (`--allow-http`), with this step's idempotency key as the
    /// `Idempotency-Key` header. See *Effects* in the crate docs.
    pub fn http(&self) -> Http<'_> {
        Http { key: &self.key }
    }

    /// Key-value state committed together with this step's outcome. See
    /// *Effects* in the crate docs.
    pub fn kv(&self) -> Kv {
        Kv { _private: () }
    }
}
