//! What `GET /metrics` shows, through the `metrics` crate.
//!
//! The handles are registered once, on first use, and kept: a lookup by
//! name on every step would cost the hot path. With no recorder installed
//! (every command but `cairn serve`) they are no-ops, so
//! [`install_prometheus`] must run before anything records.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::model::RunStatus;

/// The engine's instruments.
pub struct Metrics {
    /// Completed steps and branch attempts made durable.
    pub steps_committed: Counter,
    /// From a step's start to its durable commit.
    pub step_seconds: Histogram,
    /// Commit items per store transaction.
    pub commit_batch: Histogram,
    /// The store's COMMIT (its fsync) per transaction.
    pub fsync_seconds: Histogram,
    /// Lone commits the PostgreSQL writer polled before parking, and those
    /// of them the kernel preempted (`store/postgres/spin.rs`).
    pub commit_spins: Counter,
    pub commit_spins_preempted: Counter,
    /// Instances that started by replaying a history.
    pub replays: Counter,
    /// Failed attempts that will be tried again.
    pub retries: Counter,
    pub live_instances: Gauge,
    pub parked_runs: Gauge,
    pub sse_clients: Gauge,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The instruments (no-ops unless a recorder was installed first).
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(|| {
        metrics::describe_counter!("cairn_steps_committed_total", "Completed steps and branch attempts made durable");
        metrics::describe_histogram!("cairn_step_seconds", Unit::Seconds, "From a step's start to its durable commit");
        metrics::describe_histogram!("cairn_commit_batch_items", "Commit items per store transaction");
        metrics::describe_histogram!("cairn_fsync_seconds", Unit::Seconds, "The store's COMMIT, with its fsync");
        metrics::describe_counter!(
            "cairn_commit_spins_total",
            "Lone commits polled before the writer's thread parked (PostgreSQL)"
        );
        metrics::describe_counter!(
            "cairn_commit_spins_preempted_total",
            "Spun commits during which the kernel gave a CPU of this process to another thread"
        );
        metrics::describe_counter!("cairn_replays_total", "Instances that started by replaying a history");
        metrics::describe_counter!("cairn_retries_total", "Failed attempts that will be tried again");
        metrics::describe_gauge!("cairn_live_instances", "Workflow instances in memory in this process");
        metrics::describe_gauge!("cairn_parked_runs", "Runs of this process waiting with no instance");
        metrics::describe_gauge!("cairn_sse_clients", "Clients of the event streams");
        metrics::describe_gauge!("cairn_runs", "Runs in the database, by status");
        Metrics {
            steps_committed: metrics::counter!("cairn_steps_committed_total"),
            step_seconds: metrics::histogram!("cairn_step_seconds"),
            commit_batch: metrics::histogram!("cairn_commit_batch_items"),
            fsync_seconds: metrics::histogram!("cairn_fsync_seconds"),
            commit_spins: metrics::counter!("cairn_commit_spins_total"),
            commit_spins_preempted: metrics::counter!("cairn_commit_spins_preempted_total"),
            replays: metrics::counter!("cairn_replays_total"),
            retries: metrics::counter!("cairn_retries_total"),
            live_instances: metrics::gauge!("cairn_live_instances"),
            parked_runs: metrics::gauge!("cairn_parked_runs"),
            sse_clients: metrics::gauge!("cairn_sse_clients"),
        }
    })
}

/// Set the `cairn_runs{status=...}` gauges (read from the store at scrape
/// time); a status with no runs shows 0.
pub fn set_run_counts(counts: &[(RunStatus, u64)]) {
    for status in RunStatus::ALL {
        let n = counts.iter().find(|(s, _)| *s == status).map_or(0, |c| c.1);
        metrics::gauge!("cairn_runs", "status" => status.as_str()).set(n as f64);
    }
}

/// Decrements a gauge when dropped: a count of things alive.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.increment(1.0);
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Install the Prometheus recorder, with histogram buckets rather than
/// summaries (buckets aggregate across processes). Call before [`get`].
pub fn install_prometheus() -> anyhow::Result<PrometheusHandle> {
    const LATENCY: &[f64] =
        &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0];
    const ITEMS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY)?
        .set_buckets_for_metric(Matcher::Full("cairn_commit_batch_items".into()), ITEMS)?
        .install_recorder()?;
    if METRICS.get().is_some() {
        anyhow::bail!("metrics were recorded before the Prometheus recorder was installed");
    }
    // Registered now: a scrape shows every series, at zero until used.
    get();
    Ok(handle)
}
