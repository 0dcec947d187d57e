//! The connection pool: endpoints, health-aware selection with failover, per-request timeouts,
//! auth tokens and the retry loop every RPC goes through.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use keel_proto::etcdserverpb::AuthenticateRequest;
use keel_proto::etcdserverpb::auth_client::AuthClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};
use tonic::{Request, Status};

use crate::error::{Error, Failure, Result, classify};

/// Largest message this client decodes (range responses with many keys, snapshot chunks).
pub(crate) const MAX_MESSAGE: usize = 512 * 1024 * 1024;

/// How reads and other idempotent requests are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (at least 1).
    pub max_attempts: u32,
    /// Pause before the second attempt; doubles each time (with jitter).
    pub initial_backoff: Duration,
    /// Longest pause between two attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let d = exp.min(self.max_backoff);
        // Full jitter on the upper half keeps many clients from retrying in lockstep.
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Options of [`Client::connect`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) keep_alive: Option<(Duration, Duration)>,
    pub(crate) credentials: Option<(String, String)>,
    pub(crate) retry: RetryPolicy,
    pub(crate) unhealthy_for: Duration,
    pub(crate) require_leader: bool,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            keep_alive: Some((Duration::from_secs(5), Duration::from_secs(5))),
            credentials: None,
            retry: RetryPolicy::default(),
            unhealthy_for: Duration::from_secs(2),
            require_leader: true,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl ConnectOptions {
    /// Defaults: connect timeout 2 s, request timeout 10 s, HTTP/2 keep-alive every 5 s,
    /// 10 attempts for reads, an endpoint that failed is avoided for 2 s.
    pub fn new() -> Self {
        Self::default()
    }
    /// Time allowed to establish one connection.
    pub fn with_connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }
    /// Time allowed for one attempt of a unary request (also sent as `grpc-timeout`). Streams
    /// (watch, keep-alive, observe) and blocking calls (lock, campaign) have none.
    pub fn with_request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }
    /// HTTP/2 PING interval and timeout to detect dead connections (`None`: off).
    pub fn with_keep_alive(mut self, interval_and_timeout: Option<(Duration, Duration)>) -> Self {
        self.keep_alive = interval_and_timeout;
        self
    }
    /// Authenticate as `user` (etcd's Auth.Authenticate); the token is sent as `token` metadata
    /// and renewed when the server says `etcdserver: invalid auth token`.
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some((user.into(), password.into()));
        self
    }
    /// Retry policy of reads (writes are never retried once sent).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// How long an endpoint that failed is passed over while others remain.
    pub fn with_unhealthy_for(mut self, d: Duration) -> Self {
        self.unhealthy_for = d;
        self
    }
    /// Ask members to refuse (and cancel) watches while they have no leader, so a watch on a
    /// partitioned member moves to a healthy one (etcd's `WithRequireLeader`; default on).
    pub fn with_require_leader(mut self, on: bool) -> Self {
        self.require_leader = on;
        self
    }
    /// TLS for `https://` endpoints (feature `tls`).
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, tls: tonic::transport::ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// Whether a request may be sent again after a failure that left its outcome unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Reading twice is harmless: retried on any transient failure.
    Read,
    /// Retried only when it certainly was not sent; otherwise the failure is ambiguous.
    Write,
}

struct Endpoint {
    url: String,
    channel: Channel,
    down_until: Mutex<Option<Instant>>,
}

pub(crate) struct Inner {
    endpoints: Vec<Endpoint>,
    preferred: AtomicUsize,
    pub(crate) opts: ConnectOptions,
    token: RwLock<Option<AsciiMetadataValue>>,
    auth_lock: tokio::sync::Mutex<u64>,
    token_generation: AtomicUsize,
}

/// A handle to a Keel (or etcd) cluster. Cheap to clone (an `Arc`), `Send + Sync`; clones
/// share connections, endpoint health and the auth token.
///
/// Every unary request goes to the preferred healthy endpoint. A connection that cannot be
/// established, or a member that answers `Unavailable` (no leader, stopped), marks the endpoint
/// unhealthy for a while and the next request goes to the next endpoint. Connections are
/// re-established by themselves.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

fn normalize(ep: &str) -> String {
    if ep.contains("://") {
        ep.to_string()
    } else {
        format!("http://{ep}")
    }
}

impl Client {
    /// Connects to the cluster through `endpoints` (`host:port`, `http://host:port` or, with the
    /// `tls` feature, `https://host:port`). Connections are made lazily; with credentials the
    /// client authenticates before returning.
    pub async fn connect<E, S>(endpoints: E, opts: ConnectOptions) -> Result<Client>
    where
        E: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut eps = Vec::new();
        for ep in endpoints {
            let url = normalize(ep.as_ref());
            let mut e = TonicEndpoint::from_shared(url.clone())
                .map_err(|e| Error::Config(format!("endpoint {url}: {e}")))?
                .connect_timeout(opts.connect_timeout)
                .tcp_nodelay(true);
            if let Some((interval, timeout)) = opts.keep_alive {
                e = e
                    .http2_keep_alive_interval(interval)
                    .keep_alive_timeout(timeout)
                    .keep_alive_while_idle(true);
            }
            #[cfg(feature = "tls")]
            if url.starts_with("https://") {
                let tls = opts.tls.clone().unwrap_or_else(|| {
                    tonic::transport::ClientTlsConfig::new().with_native_roots()
                });
                e = e
                    .tls_config(tls)
                    .map_err(|e| Error::Config(format!("tls for {url}: {e}")))?;
            }
            #[cfg(not(feature = "tls"))]
            if url.starts_with("https://") {
                return Err(Error::Config(format!(
                    "{url}: https endpoints need keel-client's `tls` feature"
                )));
            }
            eps.push(Endpoint {
                url,
                channel: e.connect_lazy(),
                down_until: Mutex::new(None),
            });
        }
        if eps.is_empty() {
            return Err(Error::Config("no endpoints given".into()));
        }
        let start = rand::random::<u32>() as usize % eps.len();
        let client = Client {
            timeout: None,
            inner: Arc::new(Inner {
                endpoints: eps,
                preferred: AtomicUsize::new(start),
                opts,
                token: RwLock::new(None),
                auth_lock: tokio::sync::Mutex::new(0),
                token_generation: AtomicUsize::new(0),
            }),
        };
        if client.inner.opts.credentials.is_some() {
            client.authenticate(0).await?;
        }
        Ok(client)
    }

    /// The endpoints, as URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.endpoints.iter().map(|e| e.url.clone()).collect()
    }

    pub(crate) fn endpoint_url(&self, i: usize) -> String {
        self.inner.endpoints[i].url.clone()
    }

    /// A handle on the same connections whose unary requests get `timeout` per attempt
    /// instead of the configured request timeout (e.g. a short deadline for a health probe, a
    /// long one for a big range).
    pub fn with_request_timeout(&self, timeout: Duration) -> Client {
        Client {
            inner: self.inner.clone(),
            timeout: Some(timeout),
        }
    }

    /// The time allowed for one attempt of a unary request.
    pub fn request_timeout(&self) -> Duration {
        self.timeout.unwrap_or(self.inner.opts.request_timeout)
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ConnectOptions {
        &self.inner.opts
    }

    /// A client of the same cluster that talks to one endpoint only (index into
    /// [`Client::endpoints`]), sharing this client's connection: for per-member calls such as
    /// `endpoint status`.
    pub fn pinned(&self, index: usize) -> Result<Client> {
        let ep = self
            .inner
            .endpoints
            .get(index)
            .ok_or_else(|| Error::Config(format!("no endpoint {index}")))?;
        Ok(Client {
            timeout: self.timeout,
            inner: Arc::new(Inner {
                endpoints: vec![Endpoint {
                    url: ep.url.clone(),
                    channel: ep.channel.clone(),
                    down_until: Mutex::new(None),
                }],
                preferred: AtomicUsize::new(0),
                opts: self.inner.opts.clone(),
                token: RwLock::new(
                    self.inner
                        .token
                        .read()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone(),
                ),
                auth_lock: tokio::sync::Mutex::new(0),
                token_generation: AtomicUsize::new(0),
            }),
        })
    }

    /// Index and channel of the endpoint to use now: the preferred one if healthy, else the
    /// next healthy one, else the one that comes back soonest.
    pub(crate) fn pick(&self) -> (usize, Channel) {
        let n = self.inner.endpoints.len();
        let start = self.inner.preferred.load(Ordering::Relaxed) % n;
        let now = Instant::now();
        let mut best: Option<(usize, Instant)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let down = *self.inner.endpoints[i]
                .down_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match down {
                Some(t) if t > now => {
                    if best.is_none_or(|(_, b)| t < b) {
                        best = Some((i, t));
                    }
                }
                _ => {
                    if k != 0 {
                        self.inner.preferred.store(i, Ordering::Relaxed);
                    }
                    return (i, self.inner.endpoints[i].channel.clone());
                }
            }
        }
        let i = best.map(|(i, _)| i).unwrap_or(start);
        (i, self.inner.endpoints[i].channel.clone())
    }

    /// Marks endpoint `i` unhealthy and moves the preference to the next one.
    pub(crate) fn mark_down(&self, i: usize) {
        let n = self.inner.endpoints.len();
        *self.inner.endpoints[i]
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            Some(Instant::now() + self.inner.opts.unhealthy_for);
        let _ = self.inner.preferred.compare_exchange(
            i,
            (i + 1) % n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        tracing::debug!(endpoint = %self.inner.endpoints[i].url, "endpoint marked unhealthy");
    }

    pub(crate) fn mark_up(&self, i: usize) {
        let mut d = self.inner.endpoints[i]
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if d.is_some() {
            *d = None;
        }
    }

    /// Wraps `msg` with the auth token and, when `timeout` is set, a `grpc-timeout`.
    pub(crate) fn request<M>(&self, msg: M, timeout: bool) -> Request<M> {
        let mut req = Request::new(msg);
        if let Some(t) = self
            .inner
            .token
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            req.metadata_mut().insert("token", t);
        }
        if timeout {
            req.set_timeout(self.request_timeout());
        }
        req
    }

    /// Like [`Client::request`] for streams: no timeout, `hasleader` when configured.
    pub(crate) fn stream_request<M>(&self, msg: M) -> Request<M> {
        let mut req = self.request(msg, false);
        if self.inner.opts.require_leader {
            req.metadata_mut()
                .insert("hasleader", AsciiMetadataValue::from_static("true"));
        }
        req
    }

    pub(crate) fn token_generation(&self) -> usize {
        self.inner.token_generation.load(Ordering::Acquire)
    }

    /// Gets a fresh token, unless another task already did since `seen_generation`.
    pub(crate) async fn authenticate(&self, seen_generation: usize) -> Result<()> {
        let Some((user, password)) = self.inner.opts.credentials.clone() else {
            return Err(Error::Unauthenticated(
                "etcdserver: invalid auth token (no credentials configured)".into(),
            ));
        };
        let _guard = self.inner.auth_lock.lock().await;
        if self.token_generation() != seen_generation {
            return Ok(());
        }
        let this = self.clone();
        let resp = self
            .retry_loop(Kind::Read, false, move |ch| {
                // No token on this one: a stale token must not fail the renewal.
                let mut req = Request::new(AuthenticateRequest {
                    name: user.clone(),
                    password: password.clone(),
                });
                req.set_timeout(this.request_timeout());
                async move {
                    AuthClient::new(ch)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .authenticate(req)
                        .await
                }
            })
            .await?;
        let token = AsciiMetadataValue::try_from(resp.token.as_str())
            .map_err(|e| Error::Unauthenticated(format!("unusable token: {e}")))?;
        *self
            .inner
            .token
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(token);
        self.inner.token_generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Runs one unary RPC with failover, timeouts, token refresh and (for reads) retries.
    /// `f` builds and sends the request on the given channel (use [`Client::request`] to wrap
    /// the message so the current token is attached).
    pub(crate) async fn call<T, F, Fut>(&self, kind: Kind, f: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.retry_loop(kind, true, f).await
    }

    /// Like [`Client::call`] without this client's request timeout (blocking calls such as
    /// Lock and Campaign).
    pub(crate) async fn call_blocking<T, F, Fut>(&self, kind: Kind, f: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.retry_loop(kind, false, f).await
    }

    async fn retry_loop<T, F, Fut>(&self, kind: Kind, timeout: bool, mut f: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let policy = &self.inner.opts.retry;
        let n = self.inner.endpoints.len() as u32;
        // A request that was never sent may try every endpoint once more than the policy says.
        let max = policy.max_attempts.max(1) + n;
        let mut refreshed = false;
        let mut attempt = 0;
        let mut transient_failures = 0;
        loop {
            attempt += 1;
            let generation = self.token_generation();
            let (idx, ch) = self.pick();
            let outcome = if timeout {
                match tokio::time::timeout(
                    self.request_timeout() + Duration::from_millis(100),
                    f(ch),
                )
                .await
                {
                    Ok(r) => r.map_err(Some),
                    Err(_) => Err(None),
                }
            } else {
                f(ch).await.map_err(Some)
            };
            let (failure, err) = match outcome {
                Ok(resp) => {
                    self.mark_up(idx);
                    return Ok(resp.into_inner());
                }
                Err(Some(status)) => (classify(&status), Error::from_status(&status)),
                Err(None) => (
                    Failure::Transient,
                    Error::Timeout(format!("no answer within {:?}", self.request_timeout())),
                ),
            };
            tracing::debug!(?failure, error = %err, attempt, "request failed");
            match failure {
                Failure::Final => return Err(err),
                Failure::BadToken => {
                    if refreshed || self.inner.opts.credentials.is_none() {
                        return Err(err);
                    }
                    refreshed = true;
                    Box::pin(self.authenticate(generation)).await?;
                    continue;
                }
                Failure::NotSent => {
                    self.mark_down(idx);
                    if attempt >= max {
                        return Err(err);
                    }
                    // Try the next endpoint at once; pause once every endpoint was tried.
                    if attempt % n == 0 {
                        tokio::time::sleep(policy.backoff(attempt / n)).await;
                    }
                }
                Failure::Transient => {
                    // "etcdserver: request timed out" says nothing about the member's health.
                    if !matches!(err, Error::Timeout(_)) {
                        self.mark_down(idx);
                    }
                    if kind == Kind::Write {
                        return Err(Error::ambiguous(err));
                    }
                    transient_failures += 1;
                    if attempt >= max || transient_failures >= policy.max_attempts {
                        return Err(err);
                    }
                    tokio::time::sleep(policy.backoff(transient_failures)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failover_to_a_live_endpoint_order() {
        let c = Client::connect(
            ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
            ConnectOptions::new(),
        )
        .await
        .unwrap();
        let (i, _) = c.pick();
        c.mark_down(i);
        let (j, _) = c.pick();
        assert_ne!(i, j);
        c.mark_down(j);
        let (k, _) = c.pick();
        assert!(k != i && k != j);
        c.mark_down(k);
        // All down: the one that recovers first.
        let (l, _) = c.pick();
        assert_eq!(l, i);
        c.mark_up(j);
        assert_eq!(c.pick().0, j);
    }

    #[tokio::test]
    async fn unreachable_endpoints_fail_as_unavailable_not_ambiguous() {
        let c = Client::connect(
            ["127.0.0.1:1", "127.0.0.1:2"],
            ConnectOptions::new().with_retry(RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(2),
            }),
        )
        .await
        .unwrap();
        let e = c.put("k", "v").await.unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        let e = c.get("k").await.unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    }

    #[test]
    fn client_is_send_sync_and_cheap_to_clone() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<Client>();
    }

    #[tokio::test]
    async fn per_request_timeout_override() {
        let c = Client::connect(["127.0.0.1:1"], ConnectOptions::new())
            .await
            .unwrap();
        assert_eq!(c.request_timeout(), Duration::from_secs(10));
        let short = c.with_request_timeout(Duration::from_millis(300));
        assert_eq!(short.request_timeout(), Duration::from_millis(300));
        assert!(Arc::ptr_eq(&short.inner, &c.inner));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        assert!(p.backoff(1) <= Duration::from_millis(50));
        assert!(p.backoff(20) <= Duration::from_secs(1));
        assert!(p.backoff(20) >= Duration::from_millis(500));
    }
}
