//! Prometheus metrics, under etcd's names where they mean the same thing in Keel (dashboards and
//! alerts written for etcd keep working), served as text on `/metrics` (see [`crate::http`]).
//!
//! Most gauges are read from their source when scraped ([`Metrics::render`]); counters are
//! bumped where things happen: proposals in [`crate::node`], leader changes by a task following
//! openraft's metrics, Raft log fsyncs and apply commits through the store's timing hooks
//! ([`keel_store::observe`]; those two histograms are process-wide).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use keel_proto::keelpb::RaftRequest;
use keel_proto::keelpb::raft_request::Request as Cmd;
use keel_store::engine::{Engine, Table};
use openraft::async_runtime::WatchReceiver as _;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, exponential_buckets,
};

use crate::node::KeelNode;
use crate::watch::WatchHub;

/// How long a measured database size is reused (reading it asks RocksDB for six properties).
const DB_SIZE_TTL: Duration = Duration::from_millis(100);

/// A histogram whose `count` buckets start at `start` and double.
fn doubling_histogram(name: &str, help: &str, start: f64, count: usize) -> Histogram {
    let buckets = exponential_buckets(start, 2.0, count).expect("valid buckets");
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid histogram")
}

fn histogram(name: &str, help: &str) -> Histogram {
    // etcd's buckets: 1 ms to 8 s, doubling.
    doubling_histogram(name, help, 0.001, 14)
}

static WAL_FSYNC: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "etcd_disk_wal_fsync_duration_seconds",
        "The latency distributions of fsync called by WAL (Keel: the Raft log's group-commit fsync).",
    )
});
static BACKEND_COMMIT: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "etcd_disk_backend_commit_duration_seconds",
        "The latency distributions of commit called by backend (Keel: one apply batch's engine write).",
    )
});

/// Defragmentation (Keel: a full compaction of every table), with etcd's buckets: 0.1 s to
/// 409.6 s, doubling.
pub static DEFRAG_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    doubling_histogram(
        "etcd_disk_backend_defrag_duration_seconds",
        "The latency distribution of backend defragmentation.",
        0.1,
        13,
    )
});
pub static DEFRAG_INFLIGHT: LazyLock<IntGauge> = LazyLock::new(|| {
    IntGauge::new(
        "etcd_disk_defrag_inflight",
        "Whether or not defrag is active on the member. 1 means active, 0 means not.",
    )
    .expect("valid gauge")
});

static PEER_RTT: LazyLock<HistogramVec> = LazyLock::new(|| {
    // etcd's buckets: 0.1 ms to 3.3 s, doubling.
    let buckets = exponential_buckets(0.0001, 2.0, 16).expect("valid buckets");
    HistogramVec::new(
        HistogramOpts::new(
            "etcd_network_peer_round_trip_time_seconds",
            "Round-Trip-Time histogram between peers (Keel: an Identify call every 4 s).",
        )
        .buckets(buckets),
        &["To"],
    )
    .expect("valid histogram")
});
static PEER_SENT_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "etcd_network_peer_sent_failures_total",
            "The total number of send failures from peers (Keel: failed Raft RPCs and probes).",
        ),
        &["To"],
    )
    .expect("valid counter")
});

/// How long applying one request (or serving a read-only one) may take before etcd calls it
/// slow (`warnApplyDuration`).
pub const SLOW_APPLY: Duration = Duration::from_millis(100);
/// How long a read index may take before etcd counts it as slow (`readIndexRetryTime`).
pub const SLOW_READ_INDEX: Duration = Duration::from_millis(500);

fn counter_static(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid counter")
}

static SLOW_APPLIES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter_static(
        "etcd_server_slow_apply_total",
        "The total number of slow apply requests (likely overloaded from slow disk).",
    )
});
static SLOW_READ_INDEXES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter_static(
        "etcd_server_slow_read_indexes_total",
        "The total number of pending read indexes not in sync with leader's or timed out read index requests.",
    )
});
static READ_INDEXES_FAILED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter_static(
        "etcd_server_read_indexes_failed_total",
        "The total number of failed read indexes seen.",
    )
});
static HEARTBEAT_SEND_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter_static(
        "etcd_server_heartbeat_send_failures_total",
        "The total number of leader heartbeat send failures (likely overloaded from slow disk).",
    )
});
static LEARNER_PROMOTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter_static(
        "etcd_server_learner_promote_successes",
        "The total number of successful learner promotions while this member is leader.",
    )
});
static LEASES_RENEWED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter_static(
        "etcd_debugging_lease_renewed_total",
        "The number of renewed leases seen by the leader.",
    )
});
static LEASES_EXPIRED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter_static(
        "etcd_debugging_server_lease_expired_total",
        "The total number of expired leases.",
    )
});
static LEASE_TTLS: LazyLock<Histogram> = LazyLock::new(|| {
    doubling_histogram(
        "etcd_debugging_lease_ttl_total",
        "Bucketed histogram of lease TTLs.",
        1.0,
        24,
    )
});
/// `HashKV` (etcd's buckets: 10 ms to 163.84 s, doubling).
pub static HASH_REV_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    doubling_histogram(
        "etcd_mvcc_hash_rev_duration_seconds",
        "The latency distribution of storage hash by revision operation.",
        0.01,
        15,
    )
});
/// `Hash` (etcd's buckets: 10 ms to 163.84 s, doubling).
pub static HASH_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    doubling_histogram(
        "etcd_mvcc_hash_duration_seconds",
        "The latency distribution of storage hash operation.",
        0.01,
        15,
    )
});
/// A whole backup streamed to a client (`Maintenance.Snapshot`), etcd's buckets: 10 ms to
/// 655.36 s, doubling.
pub static BACKEND_SNAPSHOT_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    doubling_histogram(
        "etcd_disk_backend_snapshot_duration_seconds",
        "The latency distribution of backend snapshots.",
        0.01,
        17,
    )
});

/// A snapshot received from the leader, from its first byte until saved and fsynced (etcd's
/// buckets: 0.1 s to 51.2 s, doubling).
pub static SNAPSHOT_DB_SAVE: LazyLock<Histogram> = LazyLock::new(|| {
    doubling_histogram(
        "etcd_snap_db_save_total_duration_seconds",
        "The total latency distributions of v3 snapshot save",
        0.1,
        10,
    )
});
/// The fsync of a snapshot received from the leader (1 ms to 8.192 s, doubling).
pub static SNAPSHOT_DB_FSYNC: LazyLock<Histogram> = LazyLock::new(|| {
    doubling_histogram(
        "etcd_snap_db_fsync_duration_seconds",
        "The latency distributions of fsyncing .snap.db file",
        0.001,
        14,
    )
});
/// The fsync of a snapshot file this member wrote (1 ms to 8.192 s, doubling).
static SNAPSHOT_FSYNC: LazyLock<Histogram> = LazyLock::new(|| {
    doubling_histogram(
        "etcd_snap_fsync_duration_seconds",
        "The latency distributions of fsync called by snap.",
        0.001,
        14,
    )
});
/// Writing a snapshot of this member's state to a file to send it to a member (1 ms to
/// 8.192 s, doubling).
pub static SNAPSHOT_SAVE: LazyLock<Histogram> = LazyLock::new(|| {
    doubling_histogram(
        "etcd_debugging_snap_save_total_duration_seconds",
        "The total latency distributions of save called by snapshot (Keel: a snapshot written to a file to send it to a member).",
        0.001,
        14,
    )
});
static COMPACTION_KEYS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter_static(
        "etcd_debugging_mvcc_db_compaction_keys_total",
        "Total number of db keys compacted.",
    )
});
static COMPACTION_DB_PAUSE: LazyLock<Histogram> = LazyLock::new(|| {
    doubling_histogram(
        "etcd_debugging_mvcc_db_compaction_pause_duration_milliseconds",
        "Bucketed histogram of db compaction pause duration.",
        1.0,
        13,
    )
});
static COMPACTION_TOTAL: LazyLock<Histogram> = LazyLock::new(|| {
    doubling_histogram(
        "etcd_debugging_mvcc_db_compaction_total_duration_milliseconds",
        "Bucketed histogram of db compaction total duration.",
        100.0,
        14,
    )
});
static COMPACTION_INDEX_PAUSE: LazyLock<Histogram> = LazyLock::new(|| {
    doubling_histogram(
        "etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds",
        "Bucketed histogram of index compaction pause duration.",
        0.5,
        14,
    )
});

fn compaction_step(step: keel_store::observe::CompactionStep) {
    use keel_store::observe::CompactionStep;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    match step {
        CompactionStep::IndexPause(d) => COMPACTION_INDEX_PAUSE.observe(ms(d)),
        CompactionStep::DbPause(d) => COMPACTION_DB_PAUSE.observe(ms(d)),
        CompactionStep::Deleted(n) => COMPACTION_KEYS.inc_by(n),
        CompactionStep::Finished(d) => COMPACTION_TOTAL.observe(ms(d)),
    }
}

/// One applied command's duration (the store's observer): a slow one is counted and logged,
/// as etcd warns "apply request took too long".
fn applied_entry(index: u64, took: Duration) {
    if took > SLOW_APPLY {
        SLOW_APPLIES.inc();
        tracing::warn!(
            index,
            took = ?took,
            expected = ?SLOW_APPLY,
            "apply request took too long"
        );
    }
}

/// A read-only request served in `took` (etcd counts slow reads with slow applies).
pub fn read_served(what: &'static str, took: Duration) {
    if took > SLOW_APPLY {
        SLOW_APPLIES.inc();
        tracing::warn!(request = what, took = ?took, expected = ?SLOW_APPLY, "read-only range request took too long");
    }
}

/// A read index confirmed (or not) in `took`.
pub fn read_index_done(ok: bool, took: Duration) {
    if !ok {
        READ_INDEXES_FAILED.inc();
    }
    if took > SLOW_READ_INDEX {
        SLOW_READ_INDEXES.inc();
    }
}

/// A heartbeat the leader could not send (see `PeerConnection::stream_append` in `crate::network`).
pub fn heartbeat_send_failed() {
    HEARTBEAT_SEND_FAILURES.inc();
}

/// A learner promoted by this member as leader.
pub fn learner_promoted() {
    LEARNER_PROMOTIONS.inc();
}

/// A keep-alive that renewed a lease on the leader.
pub fn lease_renewed() {
    LEASES_RENEWED.inc();
}

/// A lease revoked by the leader because it expired.
pub fn lease_expired() {
    LEASES_EXPIRED.inc();
}

/// A lease granted with `ttl` seconds.
pub fn lease_granted_ttl(ttl: i64) {
    LEASE_TTLS.observe(ttl.max(0) as f64);
}

/// A soft limit from `/proc/self/limits` (`row` is the limit's name); "unlimited" is
/// `u64::MAX`, as Go's process collector reports it.
fn soft_limit(limits: &str, row: &str) -> Option<u64> {
    let rest = limits.lines().find_map(|l| l.strip_prefix(row))?;
    match rest.split_whitespace().next()? {
        "unlimited" => Some(u64::MAX),
        soft => soft.parse().ok(),
    }
}

/// This process's address-space limit (`process_virtual_memory_max_bytes`).
fn address_space_limit() -> f64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    soft_limit(&limits, "Max address space").unwrap_or(u64::MAX) as f64
}

/// etcd's names for two of the process collector's families, which it reads at every scrape:
/// `os_fd_used` is `process_open_fds`, `os_fd_limit` is `process_max_fds` (the same reading,
/// not a second one).
fn fd_aliases(
    families: &[prometheus::proto::MetricFamily],
) -> Vec<prometheus::proto::MetricFamily> {
    families
        .iter()
        .filter_map(|f| {
            let (name, help) = match f.name() {
                "process_open_fds" => ("os_fd_used", "The number of used file descriptors."),
                "process_max_fds" => ("os_fd_limit", "The file descriptor limit."),
                _ => return None,
            };
            let mut alias = f.clone();
            alias.set_name(name.to_string());
            alias.set_help(help.to_string());
            Some(alias)
        })
        .collect()
}

/// A peer probe's round trip (`To` is the peer's member ID in hex, as etcd labels it).
pub fn peer_round_trip(to: u64, rtt: Duration) {
    PEER_RTT
        .with_label_values(&[&format!("{to:x}")])
        .observe(rtt.as_secs_f64());
}

/// A Raft RPC or probe to a peer that failed.
pub fn peer_send_failed(to: u64) {
    PEER_SENT_FAILURES
        .with_label_values(&[&format!("{to:x}")])
        .inc();
}

/// The state-machine tables' size: `(allocated, in use)` bytes. The Raft log is not counted,
/// as etcd's `dbSize` does not count its WAL.
pub fn db_size(engine: &dyn Engine) -> (u64, u64) {
    Table::STATE_MACHINE
        .iter()
        .map(|t| engine.table_size(*t))
        .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
}

/// A member's metrics.
pub struct Metrics {
    registry: Registry,
    has_leader: IntGauge,
    is_leader: IntGauge,
    is_learner: IntGauge,
    pub leader_changes: IntCounter,
    proposals_committed: IntGauge,
    proposals_applied: IntGauge,
    pub proposals_failed: IntCounter,
    pub proposals_pending: IntGauge,
    /// Requests per log entry this member proposed (see [`crate::proposals`]).
    pub proposal_batch_sizes: Histogram,
    db_total: IntGauge,
    db_in_use: IntGauge,
    keys_total: IntGauge,
    current_revision: IntGauge,
    compact_revision: IntGauge,
    value_cache_bytes: IntGauge,
    value_cache_entries: IntGauge,
    value_cache_hits: IntCounter,
    mvcc_ranges: IntCounter,
    mvcc_puts: IntCounter,
    mvcc_deletes: IntCounter,
    mvcc_txns: IntCounter,
    value_cache_misses: IntCounter,
    watchers: IntGauge,
    slow_watchers: IntGauge,
    watch_streams: IntGauge,
    pending_events: IntGauge,
    watch_pending_bytes: IntGauge,
    events_sent: IntCounter,
    watch_victims: IntCounter,
    watch_catch_up_events: IntCounter,
    watch_catch_up_reads: IntCounter,
    wal_write_bytes: IntGauge,
    snapshot_installs: IntGauge,
    virtual_memory_max: prometheus::Gauge,
    auth_revision: IntGauge,
    put_bytes: IntGauge,
    debugging_db_total: IntGauge,
    /// etcd 3.4 exports the MVCC operation counters twice, under `etcd_mvcc_*` and
    /// `etcd_debugging_mvcc_*`; these are the second names (same values).
    debugging_ops: [IntCounter; 4],
    pub lease_granted: IntCounter,
    pub lease_revoked: IntCounter,
    pub grpc: Arc<crate::grpc_metrics::GrpcMetrics>,
    pub health_success: IntCounter,
    health_check_result: IntGaugeVec,
    health_checks: IntCounterVec,
    pub health_failures: IntCounter,
    /// Cached `(allocated, in use)` database size and when it was measured (ms since `epoch`).
    db_cache: (AtomicU64, AtomicU64, AtomicI64),
    epoch: Instant,
    refresh_lock: Mutex<()>,
}

impl Metrics {
    /// `quota_bytes`: the backend quota in force (`etcd_server_quota_backend_bytes`).
    /// `extensive`: `--metrics extensive` (gRPC handling-time histograms).
    pub fn new(member_id: u64, quota_bytes: u64, extensive: bool) -> Arc<Metrics> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("register");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let labelled = |name: &str, help: &str, label: &str, value: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid gauge");
            g.with_label_values(&[value]).set(1);
            registry.register(Box::new(g)).expect("register");
        };
        labelled(
            "etcd_server_version",
            "Which version is running. 1 for 'server_version' label with current version.",
            "server_version",
            crate::maintenance::ETCD_COMPAT_VERSION,
        );
        labelled(
            "etcd_cluster_version",
            "Which version is running. 1 for 'cluster_version' label with current cluster version",
            "cluster_version",
            // major.minor, as etcd labels it.
            crate::maintenance::ETCD_CLUSTER_VERSION
                .rsplit_once('.')
                .map_or(crate::maintenance::ETCD_CLUSTER_VERSION, |(minor, _)| minor),
        );
        labelled(
            "etcd_server_id",
            "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
            "server_id",
            &format!("{member_id:x}"),
        );
        labelled(
            "keel_build_info",
            "Keel's own version. 1 for 'version' label with the running version.",
            "version",
            env!("CARGO_PKG_VERSION"),
        );
        let grpc =
            crate::grpc_metrics::GrpcMetrics::register(&registry, extensive).expect("register");
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ... as
        // every Prometheus client exports them (`etcdctl check datascale` reads the memory).
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("register");
        gauge(
            "etcd_server_quota_backend_bytes",
            "Current backend storage quota size in bytes.",
        )
        .set(quota_bytes.min(i64::MAX as u64) as i64);
        for h in [&*WAL_FSYNC, &*BACKEND_COMMIT, &*DEFRAG_DURATION] {
            registry.register(Box::new(h.clone())).expect("register");
        }
        registry
            .register(Box::new(DEFRAG_INFLIGHT.clone()))
            .expect("register");
        registry
            .register(Box::new(PEER_RTT.clone()))
            .expect("register");
        registry
            .register(Box::new(PEER_SENT_FAILURES.clone()))
            .expect("register");
        crate::peer_metrics::register(&registry).expect("register");
        for c in [
            &*SLOW_APPLIES,
            &*SLOW_READ_INDEXES,
            &*READ_INDEXES_FAILED,
            &*HEARTBEAT_SEND_FAILURES,
            &*LEARNER_PROMOTIONS,
            &*LEASES_RENEWED,
            &*LEASES_EXPIRED,
            &*COMPACTION_KEYS,
        ] {
            registry.register(Box::new(c.clone())).expect("register");
        }
        for h in [
            &*LEASE_TTLS,
            &*HASH_DURATION,
            &*HASH_REV_DURATION,
            &*BACKEND_SNAPSHOT_DURATION,
            &*SNAPSHOT_DB_SAVE,
            &*SNAPSHOT_DB_FSYNC,
            &*SNAPSHOT_FSYNC,
            &*SNAPSHOT_SAVE,
            &*COMPACTION_DB_PAUSE,
            &*COMPACTION_TOTAL,
            &*COMPACTION_INDEX_PAUSE,
        ] {
            registry.register(Box::new(h.clone())).expect("register");
        }
        Arc::new(Metrics {
            has_leader: gauge(
                "etcd_server_has_leader",
                "Whether or not a leader exists. 1 is existence, 0 is not.",
            ),
            is_leader: gauge(
                "etcd_server_is_leader",
                "Whether or not this member is a leader. 1 if is, 0 otherwise.",
            ),
            is_learner: gauge(
                "etcd_server_is_learner",
                "Whether or not this member is a learner. 1 if is, 0 otherwise.",
            ),
            leader_changes: counter(
                "etcd_server_leader_changes_seen_total",
                "The number of leader changes seen.",
            ),
            proposals_committed: gauge(
                "etcd_server_proposals_committed_total",
                "The total number of consensus proposals committed (Keel: the committed Raft log index).",
            ),
            proposals_applied: gauge(
                "etcd_server_proposals_applied_total",
                "The total number of consensus proposals applied (Keel: the applied Raft log index).",
            ),
            proposals_failed: counter(
                "etcd_server_proposals_failed_total",
                "The total number of failed proposals seen.",
            ),
            proposals_pending: gauge(
                "etcd_server_proposals_pending",
                "The current number of pending proposals to commit.",
            ),
            proposal_batch_sizes: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "keel_proposal_batch_size",
                        "Client requests per Raft log entry this member proposed (writes that reach the leader together share an entry).",
                    )
                    .buckets(exponential_buckets(1.0, 2.0, 9).expect("valid buckets")),
                )
                .expect("valid histogram");
                registry.register(Box::new(h.clone())).expect("register");
                h
            },
            db_total: gauge(
                "etcd_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes.",
            ),
            db_in_use: gauge(
                "etcd_mvcc_db_total_size_in_use_in_bytes",
                "Total size of the underlying database logically in use in bytes.",
            ),
            keys_total: gauge("etcd_debugging_mvcc_keys_total", "Total number of keys."),
            current_revision: gauge(
                "etcd_debugging_mvcc_current_revision",
                "The current revision of store.",
            ),
            compact_revision: gauge(
                "etcd_debugging_mvcc_compact_revision",
                "The revision of the last compaction in store.",
            ),
            value_cache_bytes: gauge(
                "keel_value_cache_bytes",
                "Bytes held by the cache of recent values (--value-cache-bytes bounds it).",
            ),
            value_cache_entries: gauge(
                "keel_value_cache_entries",
                "Values held by the cache of recent values.",
            ),
            mvcc_ranges: counter(
                "etcd_mvcc_range_total",
                "Total number of ranges seen by this member.",
            ),
            mvcc_puts: counter(
                "etcd_mvcc_put_total",
                "Total number of puts seen by this member.",
            ),
            mvcc_deletes: counter(
                "etcd_mvcc_delete_total",
                "Total number of deletes seen by this member.",
            ),
            mvcc_txns: counter(
                "etcd_mvcc_txn_total",
                "Total number of txns seen by this member.",
            ),
            value_cache_hits: counter(
                "keel_value_cache_hits_total",
                "Values reads found in the cache of recent values.",
            ),
            value_cache_misses: counter(
                "keel_value_cache_misses_total",
                "Values reads had to fetch from the storage engine.",
            ),
            watchers: gauge(
                "etcd_debugging_mvcc_watcher_total",
                "Total number of watchers.",
            ),
            slow_watchers: gauge(
                "etcd_debugging_mvcc_slow_watcher_total",
                "Total number of unsynced slow watchers.",
            ),
            watch_streams: gauge(
                "etcd_debugging_mvcc_watch_stream_total",
                "Total number of watch streams.",
            ),
            pending_events: gauge(
                "etcd_debugging_mvcc_pending_events_total",
                "Total number of pending events to be sent.",
            ),
            events_sent: counter(
                "etcd_debugging_mvcc_events_total",
                "Total number of events sent by this member.",
            ),
            watch_pending_bytes: gauge(
                "keel_watch_pending_bytes",
                "Bytes of watch responses queued on the streams and not sent yet.",
            ),
            watch_victims: counter(
                "keel_watch_victims_total",
                "Times a watcher's stream queue was full, so it fell back to catching up from history.",
            ),
            watch_catch_up_events: counter(
                "keel_watch_catch_up_events_total",
                "Events sent to watchers from history (past start revisions and catch-up).",
            ),
            watch_catch_up_reads: counter(
                "keel_watch_catch_up_reads_total",
                "History reads for watchers catching up (one read serves every watcher of a range that needs it).",
            ),
            // A gauge in etcd too.
            wal_write_bytes: gauge(
                "etcd_disk_wal_write_bytes_total",
                "Total number of bytes written in WAL (Keel: Raft log entries appended).",
            ),
            snapshot_installs: gauge(
                "etcd_server_snapshot_apply_in_progress_total",
                "1 if the server is applying the incoming snapshot. 0 if none.",
            ),
            virtual_memory_max: {
                let g = prometheus::Gauge::new(
                    "process_virtual_memory_max_bytes",
                    "Maximum amount of virtual memory available in bytes.",
                )
                .expect("valid gauge");
                registry.register(Box::new(g.clone())).expect("register");
                g
            },
            auth_revision: gauge(
                "etcd_debugging_auth_revision",
                "The current revision of auth store.",
            ),
            put_bytes: gauge(
                "etcd_debugging_mvcc_total_put_size_in_bytes",
                "The total size of put kv pairs seen by this member.",
            ),
            debugging_db_total: gauge(
                "etcd_debugging_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes.",
            ),
            debugging_ops: [
                counter(
                    "etcd_debugging_mvcc_range_total",
                    "Total number of ranges seen by this member.",
                ),
                counter(
                    "etcd_debugging_mvcc_put_total",
                    "Total number of puts seen by this member.",
                ),
                counter(
                    "etcd_debugging_mvcc_delete_total",
                    "Total number of deletes seen by this member.",
                ),
                counter(
                    "etcd_debugging_mvcc_txn_total",
                    "Total number of txns seen by this member.",
                ),
            ],
            lease_granted: counter(
                "etcd_debugging_lease_granted_total",
                "The total number of granted leases (Keel: proposed through this member).",
            ),
            lease_revoked: counter(
                "etcd_debugging_lease_revoked_total",
                "The total number of revoked leases (Keel: proposed through this member).",
            ),
            health_success: counter(
                "etcd_server_health_success",
                "The total number of successful health checks",
            ),
            health_failures: counter(
                "etcd_server_health_failures",
                "The total number of failed health checks",
            ),
            health_check_result: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "etcd_server_healthcheck",
                        "The result of each kind of healthcheck.",
                    ),
                    &["type", "name"],
                )
                .expect("valid gauge");
                registry.register(Box::new(g.clone())).expect("register");
                g
            },
            health_checks: {
                let c = IntCounterVec::new(
                    Opts::new(
                        "etcd_server_healthchecks_total",
                        "The total number of each kind of healthcheck.",
                    ),
                    &["type", "name", "status"],
                )
                .expect("valid counter");
                registry.register(Box::new(c.clone())).expect("register");
                c
            },
            grpc,
            registry,
            db_cache: (AtomicU64::new(0), AtomicU64::new(0), AtomicI64::new(-1)),
            epoch: Instant::now(),
            refresh_lock: Mutex::new(()),
        })
    }

    /// Sends the store's fsync and commit timings to the (process-wide) histograms.
    pub fn install_store_observers() {
        keel_store::observe::set_wal_fsync_observer(Box::new(|d| {
            WAL_FSYNC.observe(d.as_secs_f64())
        }));
        keel_store::observe::set_backend_commit_observer(Box::new(|d| {
            BACKEND_COMMIT.observe(d.as_secs_f64())
        }));
        keel_store::observe::set_apply_entry_observer(Box::new(applied_entry));
        keel_store::observe::set_compaction_observer(Box::new(compaction_step));
        keel_store::observe::set_snapshot_fsync_observer(Box::new(|d| {
            SNAPSHOT_FSYNC.observe(d.as_secs_f64())
        }));
    }

    /// The database size, measured at most every `DB_SIZE_TTL`.
    pub fn db_size(&self, engine: &dyn Engine) -> (u64, u64) {
        let now = self.epoch.elapsed().as_millis() as i64;
        let at = self.db_cache.2.load(Ordering::Acquire);
        if at >= 0 && now - at < DB_SIZE_TTL.as_millis() as i64 {
            return (
                self.db_cache.0.load(Ordering::Relaxed),
                self.db_cache.1.load(Ordering::Relaxed),
            );
        }
        self.db_size_now(engine)
    }

    /// Measures the database size now (and caches it).
    pub fn db_size_now(&self, engine: &dyn Engine) -> (u64, u64) {
        let _g = self.refresh_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (total, in_use) = db_size(engine);
        self.db_cache.0.store(total, Ordering::Relaxed);
        self.db_cache.1.store(in_use, Ordering::Relaxed);
        self.db_cache
            .2
            .store(self.epoch.elapsed().as_millis() as i64, Ordering::Release);
        (total, in_use)
    }

    /// Records one `/livez` or `/readyz` check (`kind`: livez or readyz).
    pub fn health_check(&self, kind: &str, name: &str, ok: bool) {
        self.health_check_result
            .with_label_values(&[kind, name])
            .set(i64::from(ok));
        self.health_checks
            .with_label_values(&[kind, name, if ok { "success" } else { "error" }])
            .inc();
    }

    /// Counts a proposal as pending until the guard is dropped (also when the caller gives up).
    pub fn pending(&self) -> PendingGuard<'_> {
        self.proposals_pending.inc();
        PendingGuard(&self.proposals_pending)
    }

    /// Counts a successful proposal's lease grant or revocation.
    pub fn proposed(&self, op: Option<LeaseOp>) {
        match op {
            Some(LeaseOp::Grant) => self.lease_granted.inc(),
            Some(LeaseOp::Revoke) => self.lease_revoked.inc(),
            None => {}
        }
    }

    /// Prometheus' text format, with the gauges read now.
    pub fn render(&self, node: &KeelNode, hub: &WatchHub) -> String {
        let m = node.raft.metrics().borrow_watched().clone();
        let me = node.member_id();
        self.has_leader.set(i64::from(m.current_leader.is_some()));
        self.is_leader.set(i64::from(m.current_leader == Some(me)));
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == me);
        self.is_learner.set(i64::from(!voter));
        let committed = m
            .cluster_committed
            .map(|l| l.index)
            .or(m.last_applied.map(|l| l.index))
            .unwrap_or(0);
        let applied = node.applied.borrow().index;
        self.proposals_committed
            .set(committed.max(applied).min(i64::MAX as u64) as i64);
        self.proposals_applied.set(applied as i64);
        let (total, in_use) = self.db_size(node.mvcc.engine().as_ref());
        self.db_total.set(total as i64);
        self.debugging_db_total.set(total as i64);
        self.db_in_use.set(in_use as i64);
        self.keys_total.set(node.mvcc.key_count() as i64);
        self.current_revision.set(node.mvcc.current_revision());
        // -1 (never compacted) is shown as 0, as etcd's gauge starts.
        self.compact_revision
            .set(node.mvcc.compact_revision().max(0));
        let cache = node.mvcc.value_cache_stats();
        self.value_cache_bytes.set(cache.bytes as i64);
        self.value_cache_entries.set(cache.entries as i64);
        // The store counts; the counters follow (they only ever grow).
        let ops = node.mvcc.op_counts();
        let [d_ranges, d_puts, d_deletes, d_txns] = &self.debugging_ops;
        for (counter, now) in [
            (&self.mvcc_ranges, ops.ranges),
            (&self.mvcc_puts, ops.puts),
            (&self.mvcc_deletes, ops.deletes),
            (&self.mvcc_txns, ops.txns),
            (d_ranges, ops.ranges),
            (d_puts, ops.puts),
            (d_deletes, ops.deletes),
            (d_txns, ops.txns),
            (&self.events_sent, crate::watch::events_sent()),
            (&self.watch_victims, hub.victims.load(Ordering::Relaxed)),
            (
                &self.watch_catch_up_events,
                hub.catch_up_events.load(Ordering::Relaxed),
            ),
            (
                &self.watch_catch_up_reads,
                hub.catch_up_reads.load(Ordering::Relaxed),
            ),
        ] {
            counter.inc_by(now.saturating_sub(counter.get()));
        }
        self.put_bytes
            .set(ops.put_bytes.min(i64::MAX as u64) as i64);
        self.wal_write_bytes
            .set(keel_store::observe::wal_write_bytes().min(i64::MAX as u64) as i64);
        self.snapshot_installs
            .set(keel_store::observe::snapshot_installs_in_progress().min(1));
        self.virtual_memory_max.set(address_space_limit());
        self.auth_revision
            .set(node.mvcc.auth().revision().min(i64::MAX as u64) as i64);
        self.value_cache_hits
            .inc_by(cache.hits.saturating_sub(self.value_cache_hits.get()));
        self.value_cache_misses
            .inc_by(cache.misses.saturating_sub(self.value_cache_misses.get()));
        let counts = hub.counts();
        self.watchers.set(counts.watchers as i64);
        self.slow_watchers.set(counts.unsynced as i64);
        self.watch_streams.set(counts.streams as i64);
        self.pending_events.set(counts.pending_events as i64);
        self.watch_pending_bytes
            .set(counts.pending_bytes.min(i64::MAX as usize) as i64);
        let mut families = self.registry.gather();
        families.extend(fd_aliases(&families));
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::warn!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Decrements `etcd_server_proposals_pending` when dropped.
pub struct PendingGuard<'a>(&'a IntGauge);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The lease counters a proposal feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOp {
    Grant,
    Revoke,
}

impl LeaseOp {
    pub fn of(req: &RaftRequest) -> Option<LeaseOp> {
        let cmd = match &req.request {
            Some(Cmd::Authorized(a)) => a.request.as_ref().and_then(|r| r.request.as_ref()),
            other => other.as_ref(),
        };
        match cmd {
            Some(Cmd::LeaseGrant(_)) => Some(LeaseOp::Grant),
            Some(Cmd::LeaseRevoke(_)) => Some(LeaseOp::Revoke),
            _ => None,
        }
    }
}

/// Counts leader changes (etcd counts every new leader a member sees, the first one included).
pub fn spawn_leader_watch(
    node: Arc<KeelNode>,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut rx = node.raft.metrics();
        let mut last = None;
        loop {
            let leader = rx.borrow_watched().current_leader;
            if leader.is_some() && leader != last {
                metrics.leader_changes.inc();
            }
            if leader.is_some() {
                last = leader;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_over_100_ms_are_slow_and_reads_count_with_them() {
        let before = SLOW_APPLIES.get();
        applied_entry(7, Duration::from_millis(99));
        applied_entry(7, SLOW_APPLY);
        assert_eq!(SLOW_APPLIES.get(), before);
        applied_entry(7, Duration::from_millis(101));
        read_served("range", Duration::from_millis(250));
        read_served("range", Duration::from_millis(3));
        assert_eq!(SLOW_APPLIES.get(), before + 2);
    }

    #[test]
    fn read_indexes_fail_and_are_slow_independently() {
        let (failed, slow) = (READ_INDEXES_FAILED.get(), SLOW_READ_INDEXES.get());
        read_index_done(true, Duration::from_millis(10));
        read_index_done(false, Duration::from_millis(10));
        read_index_done(true, Duration::from_millis(600));
        assert_eq!(
            (READ_INDEXES_FAILED.get(), SLOW_READ_INDEXES.get()),
            (failed + 1, slow + 1)
        );
    }

    #[test]
    fn soft_limits_are_read_from_proc_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max address space         unlimited            unlimited            bytes     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(soft_limit(limits, "Max open files"), Some(1024));
        assert_eq!(soft_limit(limits, "Max address space"), Some(u64::MAX));
        assert_eq!(soft_limit(limits, "Max processes"), None);
    }
}
