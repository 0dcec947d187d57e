//! Listeners: the client gRPC services on `--listen-client-urls` and the peer service on
//! `--listen-peer-urls`, with graceful shutdown.

use std::sync::Arc;

use keel_proto::etcdserverpb::auth_server::AuthServer;
use keel_proto::etcdserverpb::cluster_server::ClusterServer;
use keel_proto::etcdserverpb::kv_server::KvServer;
use keel_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use keel_proto::keelpb::raft_peer_server::RaftPeerServer;
use tokio::sync::watch;

use crate::auth::{AdminGate, AuthService, CLUSTER_ADMIN, MAINTENANCE_ADMIN};
use crate::authority_fix::AuthorityFix;
use crate::cluster::ClusterService;
use crate::config::{Config, parse_url};
use crate::election::ElectionService;
use crate::kv::KvService;
use crate::lease::{LeaseService, Lessor};
use crate::lock::LockService;
use crate::maintenance::MaintenanceService;
use crate::node::KeelNode;
use crate::peer_service::PeerService;
use crate::watch::{WatchHub, WatchService};
use keel_proto::etcdserverpb::lease_server::LeaseServer;
use keel_proto::v3electionpb::election_server::ElectionServer;
use keel_proto::v3lockpb::lock_server::LockServer;

/// gRPC framing overhead allowed on top of `--max-request-bytes` (as etcd).
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Binds with SO_REUSEADDR, so a restarted member can listen again at once even though
/// connections of its previous life linger in TIME_WAIT.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepted connections with Nagle's algorithm off. tonic's `tcp_nodelay` applies only to
/// listeners it binds itself; without this, small responses wait for delayed ACKs (~40 ms).
fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    })
}

/// Client connections: Nagle off, and etcd 3.4 clients' malformed `:authority` repaired.
fn client_conns(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<AuthorityFix<tokio::net::TcpStream>>> {
    use futures::StreamExt;
    nodelay(listener).map(|conn| conn.map(AuthorityFix::new))
}

/// A running member and its listeners.
pub struct RunningServer {
    pub node: Arc<KeelNode>,
    pub watch_hub: Arc<WatchHub>,
    /// Turns `true` when this member has been removed from the cluster.
    pub removed: watch::Receiver<bool>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl RunningServer {
    /// Stops the member gracefully: a leader first hands leadership to another voter (see
    /// [`KeelNode::hand_over_leadership`]); then the listeners stop accepting, long-lived
    /// streams end with `etcdserver: server stopped` ([`KeelNode::until_stopping`]), in-flight
    /// requests get at most 2 s to finish, and Raft stops.
    pub async fn shutdown(self) {
        let election = std::time::Duration::from_millis(self.node.config.election_timeout);
        self.node.hand_over_leadership(election * 2).await;
        self.node.begin_stopping();
        let _ = self.shutdown.send(true);
        let grace = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(grace, t).await.is_err() {
                abort.abort();
            }
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.node.raft.shutdown())
            .await;
    }
}

/// Starts a member with `config` and serves until `shutdown` is called.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    let hub = WatchHub::new(
        config.max_request_bytes + GRPC_OVERHEAD_BYTES,
        config.watch_progress_notify_interval,
    );
    let listener_hub = hub.clone();
    let listener: keel_store::raft::state_machine::ApplyListener =
        Arc::new(move |chunk| listener_hub.on_applied(chunk));
    if config.auth_token != "simple" {
        anyhow::bail!(
            "--auth-token {}: only simple tokens are supported",
            config.auth_token
        );
    }
    let auto_compaction = crate::compactor::parse(
        &config.auto_compaction_mode,
        &config.auto_compaction_retention,
    )
    .map_err(anyhow::Error::msg)?;
    let node = KeelNode::start(config.clone(), Some(listener)).await?;
    crate::auth::spawn_token_sweeper(node.clone());
    hub.attach(node.mvcc.clone());
    let lessor = Lessor::start(node.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    crate::metrics::Metrics::install_store_observers();
    crate::metrics::spawn_leader_watch(node.clone(), node.metrics.clone(), shutdown_rx.clone());
    crate::corruption::spawn(node.clone(), shutdown_rx.clone());
    crate::network::spawn_prober(node.clone(), shutdown_rx.clone());
    crate::compactor::spawn(
        node.clone(),
        auto_compaction,
        config.auto_compaction_interval,
        shutdown_rx.clone(),
    );
    let mut tasks = Vec::new();
    let max_recv = config.max_request_bytes + GRPC_OVERHEAD_BYTES;

    for url in &config.listen_peer_urls {
        let addr = parse_url(url)
            .map_err(anyhow::Error::msg)?
            .socket_addr()
            .map_err(anyhow::Error::msg)?;
        let listener = bind(addr).map_err(|e| anyhow::anyhow!("listen on peer URL {url}: {e}"))?;
        let parsed = parse_url(url).map_err(anyhow::Error::msg)?;
        let svc = RaftPeerServer::new(PeerService::new(node.clone(), lessor.clone()))
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        let mut rx = shutdown_rx.clone();
        let incoming = nodelay(listener);
        let mut builder = tonic::transport::Server::builder();
        if parsed.tls {
            builder = builder.tls_config(crate::tls::peer_listener_config(&config)?)?;
        }
        tasks.push(tokio::spawn(
            builder
                .tcp_nodelay(true)
                .layer(crate::peer_metrics::PeerBytesLayer)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.wait_for(|s| *s).await;
                }),
        ));
        tracing::info!(%url, "serving peer traffic");
    }

    // The client gRPC services, served on every client URL and called by the JSON gateway.
    let grpc_routes = tonic::service::Routes::from(axum::Router::new())
        .add_service(
            KvServer::new(KvService::new(node.clone())).max_decoding_message_size(max_recv),
        )
        .add_service(tonic_health::pb::health_server::HealthServer::new(
            crate::health::HealthService::new(node.clone()),
        ))
        .add_service(crate::watch_wire::WatchServer::new(
            WatchService::new(node.clone(), hub.clone()),
            max_recv,
        ))
        .add_service(
            LeaseServer::new(LeaseService::new(node.clone(), lessor.clone()))
                .max_decoding_message_size(max_recv),
        )
        .add_service(AdminGate::new(
            MaintenanceServer::new(MaintenanceService::new(node.clone()))
                .max_decoding_message_size(max_recv),
            node.clone(),
            MAINTENANCE_ADMIN,
        ))
        .add_service(AdminGate::new(
            ClusterServer::new(ClusterService::new(node.clone()))
                .max_decoding_message_size(max_recv),
            node.clone(),
            CLUSTER_ADMIN,
        ))
        .add_service(
            AuthServer::new(AuthService::new(node.clone())).max_decoding_message_size(max_recv),
        )
        .add_service(
            LockServer::new(LockService::new(node.clone(), hub.clone(), lessor.clone()))
                .max_decoding_message_size(max_recv),
        )
        .add_service(
            ElectionServer::new(ElectionService::new(
                node.clone(),
                hub.clone(),
                lessor.clone(),
            ))
            .max_decoding_message_size(max_recv),
        );
    let client_routes = crate::http::routes(node.clone(), hub.clone(), grpc_routes)?;

    for url in &config.listen_client_urls {
        let parsed = parse_url(url).map_err(anyhow::Error::msg)?;
        let addr = parsed.socket_addr().map_err(anyhow::Error::msg)?;
        let listener =
            bind(addr).map_err(|e| anyhow::anyhow!("listen on client URL {url}: {e}"))?;
        let mut rx = shutdown_rx.clone();
        let mut builder = tonic::transport::Server::builder();
        if parsed.tls {
            builder = builder.tls_config(crate::tls::client_listener_config(&config)?)?;
        }
        let router = builder
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            // HTTP/1.1 too, for /health, /version, /metrics and the JSON gateway (crate::http).
            .accept_http1(true)
            .layer(crate::grpc_metrics::GrpcMetricsLayer(
                node.metrics.grpc.clone(),
            ))
            .add_routes(client_routes.clone());
        let lean_rx = rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // TLS connections go straight to rustls; plain-text ones get the :authority repair,
        // and HTTP/2 ones are served by crate::h2_server unless `--client-http2-server hyper`.
        if parsed.tls {
            tasks.push(tokio::spawn(
                router.serve_with_incoming_shutdown(nodelay(listener), stop),
            ));
        } else if config.client_http2_server == "lean" {
            let (fallback, not_http2) = tokio::sync::mpsc::unbounded_channel();
            tasks.push(tokio::spawn(router.serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnboundedReceiverStream::new(not_http2),
                stop,
            )));
            let service = tower::ServiceBuilder::new()
                .layer(crate::grpc_metrics::GrpcMetricsLayer(
                    node.metrics.grpc.clone(),
                ))
                .service(client_routes.clone());
            tasks.push(tokio::spawn(async move {
                crate::h2_server::serve(listener, service, fallback, lean_rx).await;
                Ok(())
            }));
        } else {
            tasks.push(tokio::spawn(
                router.serve_with_incoming_shutdown(client_conns(listener), stop),
            ));
        }
        tracing::info!(%url, "serving client traffic");
    }

    // --listen-metrics-urls: /metrics and the health endpoints only, as etcd's.
    let metrics_routes = tonic::service::Routes::from(
        crate::http::metrics_routes(node.clone(), hub.clone()).fallback(crate::http::not_found),
    );
    for url in &config.listen_metrics_urls {
        let parsed = parse_url(url).map_err(anyhow::Error::msg)?;
        let addr = parsed.socket_addr().map_err(anyhow::Error::msg)?;
        let listener =
            bind(addr).map_err(|e| anyhow::anyhow!("listen on metrics URL {url}: {e}"))?;
        let mut builder = tonic::transport::Server::builder();
        if parsed.tls {
            builder = builder.tls_config(crate::tls::client_listener_config(&config)?)?;
        }
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(
            builder
                .accept_http1(true)
                .add_routes(metrics_routes.clone())
                .serve_with_incoming_shutdown(nodelay(listener), async move {
                    let _ = rx.wait_for(|s| *s).await;
                }),
        ));
        tracing::info!(%url, "serving metrics");
    }

    let removed = crate::cluster::spawn_background(node.clone());
    Ok(RunningServer {
        node,
        watch_hub: hub,
        removed,
        shutdown: shutdown_tx,
        tasks,
    })
}
