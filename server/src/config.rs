//! Command-line flags and `KEEL_*` environment variables, named after etcd's flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClusterState {
    New,
    Existing,
}

/// `--metrics`: which gRPC metrics are exported, as etcd's flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricsLevel {
    /// Counters only.
    Basic,
    /// Counters and `grpc_server_handling_seconds` histograms.
    Extensive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keel: a Raft-replicated key-value store that speaks the etcd v3 API.
// The field docs are the `--help` text, where `<name>` is a placeholder, not HTML.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, Clone, Parser)]
#[command(name = "keel", version, about)]
pub struct Config {
    /// Human-readable name for this member.
    #[arg(long, env = "KEEL_NAME", default_value = "default")]
    pub name: String,

    /// Path to the data directory [default: ./<name>.keel].
    #[arg(long, env = "KEEL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Comma-separated URLs to listen on for client traffic.
    #[arg(
        long,
        env = "KEEL_LISTEN_CLIENT_URLS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub listen_client_urls: Vec<String>,

    /// Comma-separated client URLs advertised to the rest of the cluster [default: the listen URLs].
    #[arg(long, env = "KEEL_ADVERTISE_CLIENT_URLS", value_delimiter = ',')]
    pub advertise_client_urls: Vec<String>,

    /// Comma-separated URLs that serve only /metrics, /health, /livez and /readyz (HTTP/1.1;
    /// https:// ones use the client certificate, --cert-file and --key-file), as etcd's.
    #[arg(long, env = "KEEL_LISTEN_METRICS_URLS", value_delimiter = ',')]
    pub listen_metrics_urls: Vec<String>,

    /// basic or extensive: extensive adds the grpc_server_handling_seconds histograms.
    #[arg(long, env = "KEEL_METRICS", value_enum, default_value = "basic")]
    pub metrics: MetricsLevel,

    /// Comma-separated URLs to listen on for peer (Raft) traffic.
    #[arg(
        long,
        env = "KEEL_LISTEN_PEER_URLS",
        default_value = "http://127.0.0.1:2380",
        value_delimiter = ','
    )]
    pub listen_peer_urls: Vec<String>,

    /// Comma-separated peer URLs advertised to the rest of the cluster [default: the listen URLs].
    #[arg(long, env = "KEEL_INITIAL_ADVERTISE_PEER_URLS", value_delimiter = ',')]
    pub initial_advertise_peer_urls: Vec<String>,

    /// Initial cluster configuration for bootstrapping: name1=url1,name2=url2,...
    /// [default: <name>=<first advertised peer URL>].
    #[arg(long, env = "KEEL_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,

    /// new: bootstrap a new cluster; existing: join a running cluster (after MemberAdd).
    #[arg(
        long,
        env = "KEEL_INITIAL_CLUSTER_STATE",
        value_enum,
        default_value = "new"
    )]
    pub initial_cluster_state: ClusterState,

    /// Make this member the only member of its cluster, keeping its data (etcd's
    /// `--force-new-cluster`, for a cluster that lost its quorum for good; see
    /// docs/membership.md). Ignored for a data directory that does not exist yet.
    #[arg(long, env = "KEEL_FORCE_NEW_CLUSTER")]
    pub force_new_cluster: bool,

    /// Initial cluster token; distinguishes clusters bootstrapped from the same configuration.
    #[arg(
        long,
        env = "KEEL_INITIAL_CLUSTER_TOKEN",
        default_value = "keel-cluster"
    )]
    pub initial_cluster_token: String,

    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "KEEL_MAX_REQUEST_BYTES", default_value_t = 1536 * 1024)]
    pub max_request_bytes: usize,

    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "KEEL_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: usize,

    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "KEEL_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,

    /// Time (in milliseconds) for an election to timeout. A follower that hears nothing from
    /// the leader for 1 to 1.5 times this long starts an election (a value below three heartbeat
    /// intervals counts as three).
    #[arg(long, env = "KEEL_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,

    /// Number of committed entries between Raft snapshots.
    #[arg(long, env = "KEEL_SNAPSHOT_COUNT", default_value_t = 100_000)]
    pub snapshot_count: u64,

    /// Log entries kept behind the newest snapshot when the log is purged, so that a member
    /// that fell a little behind catches up from the log instead of needing a snapshot (etcd's
    /// flag of the same name; its default).
    #[arg(
        long,
        env = "KEEL_EXPERIMENTAL_SNAPSHOT_CATCHUP_ENTRIES",
        default_value_t = 5_000
    )]
    pub experimental_snapshot_catchup_entries: u64,

    /// Interval of server-side progress notifications to watchers that asked for them
    /// (e.g. 10m, 30s, 500ms).
    #[arg(long, env = "KEEL_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub watch_progress_notify_interval: Duration,

    /// Raise a NOSPACE alarm (and refuse writes) when the backend grows beyond this many bytes;
    /// 0 means etcd's default of 2 GiB.
    #[arg(long, env = "KEEL_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: u64,

    /// Bytes of the newest writes' values kept in memory, so reads of recently written keys
    /// skip the storage engine (about 64 bytes of bookkeeping per value counted); 0 turns the
    /// cache off.
    #[arg(long, env = "KEEL_VALUE_CACHE_BYTES", default_value_t = keel_store::mvcc::recent::DEFAULT_BUDGET_BYTES)]
    pub value_cache_bytes: usize,

    /// Pack client writes that reach the leader together into one Raft log entry, each keeping
    /// its own revision and response (`--proposal-batching=false` to turn it off). Leaders batch
    /// only while every member says it applies such entries, so `false` on any one member
    /// turns batching off for the whole cluster.
    #[arg(
        long,
        env = "KEEL_PROPOSAL_BATCHING",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub proposal_batching: bool,

    /// Which HTTP/2 server takes plain-text client connections: `lean` (Keel's, on `h2`
    /// directly: a connection's calls are driven by its own task and their responses written
    /// together) or `hyper` (tonic's server, a task per call). TLS listeners and HTTP/1.1
    /// requests always use tonic's.
    #[arg(long, env = "KEEL_CLIENT_HTTP2_SERVER", default_value = "lean", value_parser = ["lean", "hyper"])]
    pub client_http2_server: String,

    /// Auto-compaction mode: `periodic` (retention is a duration, e.g. 1h or a bare number of
    /// hours) or `revision` (retention is a number of revisions).
    #[arg(long, env = "KEEL_AUTO_COMPACTION_MODE", default_value = "periodic")]
    pub auto_compaction_mode: String,

    /// Auto-compaction retention; "0" turns auto-compaction off (etcd's default).
    #[arg(long, env = "KEEL_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,

    /// How often the leader compares HashKV across members and raises a CORRUPT alarm on a
    /// mismatch (etcd's `--experimental-corrupt-check-time`); 0 turns the check off.
    #[arg(
        long = "corrupt-check-time",
        alias = "experimental-corrupt-check-time",
        env = "KEEL_CORRUPT_CHECK_TIME",
        default_value = "5m",
        value_parser = parse_duration_or_zero
    )]
    pub corrupt_check_time: Duration,

    /// TESTING: how often revision-mode auto-compaction runs (etcd: fixed at 5m).
    #[arg(
        long = "debug-auto-compaction-interval",
        env = "KEEL_DEBUG_AUTO_COMPACTION_INTERVAL",
        default_value = "5m",
        value_parser = parse_duration,
        hide = true
    )]
    pub auto_compaction_interval: Duration,

    /// Auth token type: `simple` (etcd's default; random tokens held in memory by every member).
    #[arg(long, env = "KEEL_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,

    /// Seconds a simple token stays valid without being used.
    #[arg(long, env = "KEEL_AUTH_TOKEN_TTL", default_value_t = 300)]
    pub auth_token_ttl: u64,

    /// bcrypt cost of stored password hashes (etcd's default 10; 4 to 31).
    #[arg(long, env = "KEEL_BCRYPT_COST", default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=31))]
    pub bcrypt_cost: u32,

    /// Client TLS certificate (PEM); required by https:// client URLs.
    #[arg(long, env = "KEEL_CERT_FILE")]
    pub cert_file: Option<PathBuf>,

    /// Client TLS private key (PEM).
    #[arg(long, env = "KEEL_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// CA bundle (PEM) that client certificates must chain to.
    #[arg(long, env = "KEEL_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,

    /// Require a client certificate signed by --trusted-ca-file on https:// client URLs; with
    /// auth enabled, its common name is the user when a request carries no token.
    #[arg(long, env = "KEEL_CLIENT_CERT_AUTH")]
    pub client_cert_auth: bool,

    /// Peer TLS certificate (PEM); required by https:// peer URLs, and presented to peers.
    #[arg(long, env = "KEEL_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,

    /// Peer TLS private key (PEM).
    #[arg(long, env = "KEEL_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,

    /// CA bundle (PEM) that peer certificates must chain to (also used to verify peers this
    /// member connects to).
    #[arg(long, env = "KEEL_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,

    /// Require peers to present a certificate signed by --peer-trusted-ca-file.
    #[arg(long, env = "KEEL_PEER_CLIENT_CERT_AUTH")]
    pub peer_client_cert_auth: bool,

    /// Log level: error, warn, info, debug, trace (or a tracing filter directive).
    #[arg(long, env = "KEEL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log output format.
    #[arg(long, env = "KEEL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// TESTING ONLY: serve linearizable reads from local state without confirming leadership.
    /// This breaks linearizability under partitions; it exists so the fault-testing harness can
    /// prove that it detects such a violation.
    #[arg(
        long = "debug-unsafe-local-reads",
        env = "KEEL_DEBUG_UNSAFE_LOCAL_READS",
        hide = true
    )]
    pub unsafe_local_reads: bool,

    /// TESTING ONLY: this member answers HashKV with a wrong hash, so tests can show that the
    /// leader's corruption check raises a CORRUPT alarm naming it.
    #[arg(
        long = "debug-corrupt-hashkv",
        env = "KEEL_DEBUG_CORRUPT_HASHKV",
        hide = true
    )]
    pub debug_corrupt_hashkv: bool,
}

impl Config {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.keel", self.name)))
    }

    pub fn advertise_client_urls(&self) -> Vec<String> {
        if self.advertise_client_urls.is_empty() {
            self.listen_client_urls.clone()
        } else {
            self.advertise_client_urls.clone()
        }
    }

    pub fn advertise_peer_urls(&self) -> Vec<String> {
        if self.initial_advertise_peer_urls.is_empty() {
            self.listen_peer_urls.clone()
        } else {
            self.initial_advertise_peer_urls.clone()
        }
    }

    pub fn auth_token_ttl(&self) -> Duration {
        Duration::from_secs(self.auth_token_ttl.max(1))
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval)
    }

    pub fn election(&self) -> Duration {
        Duration::from_millis(self.election_timeout)
    }

    /// The members named by `--initial-cluster`, in the order given.
    pub fn initial_members(&self) -> Result<Vec<(String, Vec<String>)>, String> {
        let spec = match &self.initial_cluster {
            Some(s) => s.clone(),
            None => format!(
                "{}={}",
                self.name,
                self.advertise_peer_urls().join(&format!(",{}=", self.name))
            ),
        };
        let mut members: Vec<(String, Vec<String>)> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, url) = part
                .split_once('=')
                .ok_or_else(|| format!("--initial-cluster: '{part}' is not name=url"))?;
            parse_url(url).map_err(|e| format!("--initial-cluster: {e}"))?;
            match members.iter_mut().find(|(n, _)| n == name) {
                Some((_, urls)) => urls.push(url.to_string()),
                None => members.push((name.to_string(), vec![url.to_string()])),
            }
        }
        if !members.iter().any(|(n, _)| n == &self.name) {
            return Err(format!(
                "--initial-cluster does not contain this member's name '{}'",
                self.name
            ));
        }
        Ok(members)
    }
}

/// A parsed `http://host:port` (or `https://`, `unix://` not supported) URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl ListenUrl {
    pub fn socket_addr(&self) -> Result<std::net::SocketAddr, String> {
        use std::net::ToSocketAddrs;
        let host = if self.host.is_empty() {
            "0.0.0.0"
        } else {
            &self.host
        };
        (
            host.trim_start_matches('[').trim_end_matches(']'),
            self.port,
        )
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}:{}: {e}", self.port))?
            .next()
            .ok_or_else(|| format!("cannot resolve {host}"))
    }
}

/// Parses durations as etcd's flags write them: `500ms`, `30s`, `10m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration '{s}'"))?;
    let ms = match unit {
        "ms" => n,
        "s" | "" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => {
            return Err(format!(
                "invalid duration unit in '{s}' (use ms, s, m or h)"
            ));
        }
    };
    if ms == 0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_millis(ms))
}

/// Like [`parse_duration`], but `0` (with or without a unit) is allowed and means off.
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .parse::<u64>()
        == Ok(0)
    {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

pub fn parse_url(url: &str) -> Result<ListenUrl, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(format!("URL '{url}' must start with http:// or https://"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("URL '{url}' has no port"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("URL '{url}' has an invalid port"))?;
    Ok(ListenUrl {
        tls,
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_etcd() {
        let c = Config::parse_from(["keel"]);
        assert_eq!(c.listen_client_urls, vec!["http://127.0.0.1:2379"]);
        assert_eq!(c.max_request_bytes, 1_572_864);
        assert_eq!(c.max_txn_ops, 128);
        assert_eq!(c.data_dir(), PathBuf::from("default.keel"));
        assert_eq!(
            c.initial_members().unwrap(),
            vec![(
                "default".to_string(),
                vec!["http://127.0.0.1:2380".to_string()]
            )]
        );
    }

    #[test]
    fn initial_cluster_parsing() {
        let c = Config::parse_from([
            "keel",
            "--name",
            "b",
            "--initial-cluster",
            "a=http://127.0.0.1:1,b=http://127.0.0.1:2,c=http://127.0.0.1:3",
        ]);
        let m = c.initial_members().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[1],
            ("b".to_string(), vec!["http://127.0.0.1:2".to_string()])
        );
        let bad = Config::parse_from([
            "keel",
            "--name",
            "z",
            "--initial-cluster",
            "a=http://127.0.0.1:1",
        ]);
        assert!(bad.initial_members().unwrap_err().contains("'z'"));
        let bad = Config::parse_from(["keel", "--initial-cluster", "default=127.0.0.1:1"]);
        assert!(bad.initial_members().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(
            parse_duration("0s").is_err()
                && parse_duration("5d").is_err()
                && parse_duration("x").is_err()
        );
        assert_eq!(parse_duration_or_zero("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration_or_zero("0s").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_duration_or_zero("5m").unwrap(),
            Duration::from_secs(300)
        );
        assert!(parse_duration_or_zero("x").is_err());
    }

    #[test]
    fn url_parsing() {
        assert_eq!(
            parse_url("http://127.0.0.1:2379").unwrap(),
            ListenUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 2379
            }
        );
        assert!(parse_url("https://[::1]:2379/").unwrap().tls);
        assert!(parse_url("tcp://x:1").is_err());
        assert!(parse_url("http://x").is_err());
    }
}
