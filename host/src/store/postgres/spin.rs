//! Spin, then park: the writer polls a lone commit for a short while
//! before its thread sleeps.
//!
//! A lone run's step waits for its commit, and nothing else in the process
//! is ready to run meanwhile, so the runtime's thread parks in `epoll_wait`
//! and its CPU goes idle. On a virtual machine an idle vCPU halts, and the
//! server's answer must then wake it through the hypervisor. On this
//! project's 2-vCPU machine (a Firecracker VM whose kernel does not poll
//! before halting, `guest_halt_poll_ns=0`), that costs tens of microseconds
//! of a commit of about 200. A client that answers within a microsecond or
//! two often keeps itself and its backend on one CPU and escapes this; an
//! engine that does real work per step does not: W1-pg ran at 0.69 to 0.79
//! of the single-row client's rate, and at 1.0 with the kernel's idle
//! polling turned on for a test.
//!
//! So a lone commit is polled without parking (the thread yields to the
//! runtime, which polls its sockets with a zero timeout and runs any other
//! ready task first) for up to twice its typical time, and parks after that.
//! Measured on that machine: W1-pg at 0.84 to 0.92 of the baseline, `cairn run` of
//! 4,000 steps 12 to 18% faster, one `cairn worker` with one run 22 to 27%
//! faster. It costs CPU: W1-pg's process spends 190 to 220 µs of CPU per
//! step instead of 46 to 79. And a spinning thread takes a CPU someone else may
//! need: two worker processes with two runs each lost 12 to 15% of their
//! throughput to spinning before the rules below. It is done only where it
//! pays:
//! - a lone commit of the only run this process holds: with other runs
//!   here, the CPU belongs to them;
//! - commits that typically answer within the budget ([`BUDGET`], or
//!   `CAIRN_COMMIT_SPIN_US`; 0 turns spinning off, and a value that is not
//!   a whole number is refused when the store opens): a slower disk or a
//!   distant server gains nothing from a spin that ends before the answer;
//! - a runtime of one worker thread (as `cairn` has on 2 CPUs): with more,
//!   an idle sibling holds the runtime's I/O driver in a waiting
//!   `epoll_wait`, so a yielding task cannot poll the sockets, and every
//!   yield would wake a sibling to look for work;
//! - a CPU to spare: at least two CPUs available to the process (its
//!   affinity and cgroup quota counted), and spins that the kernel seldom
//!   interrupts for another thread. When half of the last eight spins were
//!   preempted (several busy processes on few CPUs), this process stops
//!   spinning, and tries again once every [`RETRY_EVERY`] lone commits.

use std::future::{Future, poll_fn};
use std::task::Poll;
use std::time::{Duration, Instant};

/// Spin at most this long per commit, and only for commits that typically
/// take less.
const BUDGET: Duration = Duration::from_micros(500);

/// The environment variable that sets the budget in microseconds.
pub(super) const BUDGET_VAR: &str = "CAIRN_COMMIT_SPIN_US";

/// While spins are preempted, one lone commit in this many spins anyway, to
/// find out whether the CPU is free again.
const RETRY_EVERY: u32 = 64;

/// The budget `CAIRN_COMMIT_SPIN_US` sets (`value`), or the default.
pub(super) fn budget(value: Option<&str>) -> Result<Duration, String> {
    match value {
        None => Ok(BUDGET),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map(Duration::from_micros)
            .map_err(|_| format!("{BUDGET_VAR}={v:?} is not a whole number of microseconds (0 turns spinning off)")),
    }
}

/// When to spin, learnt from the lone commits seen so far.
pub(super) struct Spin {
    budget: Duration,
    /// A moving average of lone commits' times (`None` before the first).
    typical: Option<Duration>,
    /// Whether each of the last eight spins was preempted (lowest bit: the
    /// latest).
    preempted: u8,
    /// Lone commits not spun for preemption since the last spin.
    held_back: u32,
    /// Lone commits seen; the first (which connects and prepares) is not
    /// counted in `typical`.
    seen: u64,
}

impl Spin {
    /// The policy for a writer on the current runtime: `budget` where this
    /// process has CPUs to spare and a runtime of one worker, none elsewhere.
    pub(super) fn on_this_runtime(budget: Duration) -> Spin {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        // A yielding task polls the sockets only if its thread gets the
        // runtime's I/O driver: with sibling worker threads, an idle one
        // holds it in a waiting `epoll_wait`, takes the answer (the wake this
        // is to avoid), and each yield wakes another sibling to look for
        // work. So only on a runtime of one worker (`cairn` on 2 CPUs).
        let one_worker = tokio::runtime::Handle::try_current().is_ok_and(|h| h.metrics().num_workers() == 1);
        Spin::new(if cpus >= 2 && one_worker { budget } else { Duration::ZERO })
    }

    fn new(budget: Duration) -> Spin {
        Spin { budget, typical: None, preempted: 0, held_back: 0, seen: 0 }
    }

    /// How long to poll the next commit, of `items` items while this
    /// process holds `runs` runs, before parking. (Holding none, the commit
    /// is not a run's step: a new run's, a signal's, a cancel's.)
    fn limit(&mut self, items: usize, runs: usize) -> Duration {
        let limit = match self.typical {
            _ if items != 1 || runs != 1 || self.budget.is_zero() => return Duration::ZERO,
            None => return Duration::ZERO,
            Some(t) if t > self.budget => return Duration::ZERO,
            Some(t) => (t * 2).min(self.budget),
        };
        if self.preempted.count_ones() >= 4 && self.held_back < RETRY_EVERY {
            self.held_back += 1;
            return Duration::ZERO;
        }
        self.held_back = 0;
        limit
    }

    /// A lone commit took `took`; `preempted` if it was spun and the kernel
    /// interrupted the spin for another thread.
    fn observe(&mut self, took: Duration, spun: bool, preempted: bool) {
        self.seen += 1;
        // The first is no guide: it connects and prepares its statement.
        if self.seen > 1 {
            self.typical = Some(match self.typical {
                None => took,
                Some(t) => (t * 7 + took) / 8,
            });
        }
        if spun {
            self.preempted = self.preempted << 1 | u8::from(preempted);
        }
    }

    /// A batch of `items` items committed by `work`, spun on if this policy
    /// says so; `runs` (the runs this process holds) is asked of lone ones only.
    pub(super) async fn drive<F: Future>(&mut self, items: usize, runs: impl FnOnce() -> usize, work: F) -> F::Output {
        if items != 1 {
            return work.await;
        }
        let limit = self.limit(items, runs());
        let started = Instant::now();
        let (out, preempted) = spin_then_park(limit, work).await;
        self.observe(started.elapsed(), !limit.is_zero(), preempted);
        if !limit.is_zero() {
            let metrics = crate::telemetry::get();
            metrics.commit_spins.increment(1);
            if preempted {
                metrics.commit_spins_preempted.increment(1);
            }
        }
        out
    }
}

/// `work`'s output, polled without parking for up to `limit` and then
/// awaited; and whether the kernel preempted this process during the spin.
async fn spin_then_park<F: Future>(limit: Duration, work: F) -> (F::Output, bool) {
    let mut work = std::pin::pin!(work);
    if limit.is_zero() {
        return (work.await, false);
    }
    let switches = involuntary_switches();
    let until = Instant::now() + limit;
    loop {
        if let Poll::Ready(out) = poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await {
            return (out, involuntary_switches() > switches);
        }
        if Instant::now() >= until {
            break;
        }
        // Back to the runtime: it runs what else is ready, and polls its
        // sockets without waiting before it polls this task again.
        tokio::task::yield_now().await;
    }
    let preempted = involuntary_switches() > switches;
    (work.await, preempted)
}

/// How often the kernel has taken a CPU from this process's threads for
/// another thread.
fn involuntary_switches() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given, which outlives the call.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    usage.ru_nivcsw as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// A spin policy that has seen its first (unguiding) commit and then
    /// one of `took`.
    fn learnt(took: Duration) -> Spin {
        let mut spin = Spin::new(500 * US);
        spin.observe(5_000 * US, false, false);
        assert_eq!(spin.limit(1, 1), Duration::ZERO, "the first commit teaches nothing");
        spin.observe(took, false, false);
        spin
    }

    #[test]
    fn spins_only_for_lone_commits_that_typically_answer_within_the_budget() {
        let mut spin = learnt(200 * US);
        assert_eq!(spin.limit(1, 1), 400 * US, "twice the typical time");
        assert_eq!(spin.limit(2, 1), Duration::ZERO, "a batch of two is not lone");
        assert_eq!(spin.limit(1, 2), Duration::ZERO, "another run held here may need the CPU");
        assert_eq!(spin.limit(1, 0), Duration::ZERO, "no run held: not a step's commit");
        spin.observe(300 * US, true, false);
        assert_eq!(spin.limit(1, 1), 425 * US, "the typical time moves an eighth of the way");
        for _ in 0..40 {
            spin.observe(2_000 * US, true, false);
        }
        assert_eq!(spin.limit(1, 1), Duration::ZERO, "slow commits: no spin");
        for _ in 0..60 {
            spin.observe(100 * US, false, false);
        }
        let limit = spin.limit(1, 1);
        assert!((200 * US..210 * US).contains(&limit), "fast again: spins again ({limit:?})");
        let mut off = Spin::new(Duration::ZERO);
        off.observe(100 * US, false, false);
        off.observe(100 * US, false, false);
        assert_eq!(off.limit(1, 1), Duration::ZERO, "a budget of 0 turns it off");
    }

    /// As the writer drives it: `observe` is told whether `limit` let the
    /// commit spin.
    fn commit(spin: &mut Spin, preempted: bool) -> bool {
        let spun = !spin.limit(1, 1).is_zero();
        spin.observe(200 * US, spun, spun && preempted);
        spun
    }

    #[test]
    fn preempted_spins_stop_spinning_until_retries_find_the_cpu_free() {
        let mut spin = learnt(200 * US);
        for _ in 0..3 {
            assert!(commit(&mut spin, true));
        }
        assert!(commit(&mut spin, true), "three preempted spins in eight are tolerated");
        // Four of the last eight were preempted: one retry in RETRY_EVERY + 1.
        let spun: Vec<bool> = (0..=RETRY_EVERY).map(|_| commit(&mut spin, true)).collect();
        assert_eq!(spun.iter().filter(|s| **s).count(), 1, "one retry");
        assert!(spun[RETRY_EVERY as usize], "after RETRY_EVERY held back");
        // Retries that find the CPU free push the preempted spins out of the
        // last eight, one per retry; with three left, it spins at every commit.
        let mut retries = 0;
        while !(commit(&mut spin, false) && commit(&mut spin, false)) {
            retries += 1;
            assert!(retries < 10 * RETRY_EVERY, "never spins again");
        }
        assert!(
            (4 * RETRY_EVERY..6 * RETRY_EVERY).contains(&retries),
            "about five free retries to spin again ({retries} commits)"
        );
    }

    #[test]
    fn the_budget_is_a_whole_number_of_microseconds() {
        assert_eq!(budget(None), Ok(BUDGET));
        assert_eq!(budget(Some("250")), Ok(250 * US));
        assert_eq!(budget(Some("0")), Ok(Duration::ZERO));
        for bad in ["fast", "-1", "0.5", ""] {
            let e = budget(Some(bad)).unwrap_err();
            assert!(e.contains(BUDGET_VAR) && e.contains("microseconds"), "{e}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_spun_future_is_awaited_once_the_limit_is_over() {
        let (quick, _) = spin_then_park(Duration::from_millis(50), async { 7 }).await;
        assert_eq!(quick, 7);
        // Ready only long after the spin's limit: polled while spinning, then
        // once more when woken, and not in between.
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let _ = tx.send(8);
        });
        let started = Instant::now();
        let polls = std::sync::Mutex::new(Vec::new());
        let mut rx = std::pin::pin!(rx);
        let watched = poll_fn(|cx| {
            polls.lock().unwrap().push(started.elapsed());
            rx.as_mut().poll(cx)
        });
        let (out, _) = spin_then_park(Duration::from_millis(1), watched).await;
        assert_eq!(out.unwrap(), 8);
        let polls = polls.into_inner().unwrap();
        assert!(polls.len() > 2, "polled while spinning: {polls:?}");
        let (last, before) = (polls[polls.len() - 1], polls[polls.len() - 2]);
        assert!(last >= Duration::from_millis(300), "the answer came at 300 ms: {last:?}");
        assert!(before < Duration::from_millis(150), "the spin stopped near its limit of 1 ms: {before:?}");
    }
}
