//! Watches that survive disconnects.
//!
//! A [`Watcher`] runs one gRPC Watch stream in a background task. When the stream breaks (the
//! member died or restarted, lost its leader, the connection dropped) the task opens a new one,
//! on another endpoint if needed, starting at the revision after the last one it delivered, so
//! no event is lost or repeated. If that revision has been compacted meanwhile the watcher says
//! so with [`WatchEvent::Compacted`] and ends: the caller must re-read the state (an
//! [`crate::Informer`] does that by itself).
//!
//! ```no_run
//! # async fn f(client: keel_client::Client) -> keel_client::Result<()> {
//! use keel_client::{WatchEvent, WatchOptions};
//! let mut w = client.watch("jobs/", WatchOptions::new().prefix().progress_notify()).await?;
//! while let Some(ev) = w.next().await {
//!     match ev? {
//!         WatchEvent::Events { events, .. } => for e in events { println!("{:?} {}", e.kind, e.kv.key_str()) },
//!         WatchEvent::Progress { revision } => println!("up to date at {revision}"),
//!         WatchEvent::Compacted { compact_revision } => { println!("relist, compacted at {compact_revision}"); break }
//!     }
//! }
//! # Ok(()) }
//! ```

use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};

use futures::Stream;
use keel_proto::etcdserverpb::{
    self as pb, watch_client::WatchClient, watch_create_request::FilterType, watch_request,
};
use keel_proto::mvccpb::event::EventType;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{Client, MAX_MESSAGE};
use crate::error::{Error, Failure, Result, classify};
use crate::kv::{KeyValue, prefix_end, prefix_key};

/// Options of [`Client::watch`].
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    range_end: Option<Vec<u8>>,
    prefix: bool,
    start_revision: i64,
    prev_kv: bool,
    progress_notify: bool,
    no_put: bool,
    no_delete: bool,
}

impl WatchOptions {
    /// Watch one key from now on.
    pub fn new() -> Self {
        Self::default()
    }
    /// Every key starting with the key.
    pub fn prefix(mut self) -> Self {
        self.prefix = true;
        self
    }
    /// Keys in `[key, end)`.
    pub fn range_end(mut self, end: impl Into<Vec<u8>>) -> Self {
        self.range_end = Some(end.into());
        self
    }
    /// Deliver events from this revision on (0: from now).
    pub fn start_revision(mut self, rev: i64) -> Self {
        self.start_revision = rev;
        self
    }
    /// Include each key's previous value.
    pub fn prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
    /// Have the server send periodic [`WatchEvent::Progress`] while idle.
    pub fn progress_notify(mut self) -> Self {
        self.progress_notify = true;
        self
    }
    /// Leave out puts.
    pub fn no_put(mut self) -> Self {
        self.no_put = true;
        self
    }
    /// Leave out deletes.
    pub fn no_delete(mut self) -> Self {
        self.no_delete = true;
        self
    }
}

/// Kind of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EventKind {
    /// Created or updated.
    Put,
    /// Deleted (by request or lease expiry).
    Delete,
}

/// One change of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change (for a delete: key and `mod_revision` only).
    pub kv: KeyValue,
    /// The key before, with [`WatchOptions::prev_kv`].
    pub prev_kv: Option<KeyValue>,
}

/// What a [`Watcher`] delivers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum WatchEvent {
    /// Changes, in revision order (all changes of one revision come together).
    Events {
        /// The store's revision when the server sent them.
        revision: i64,
        /// The changes.
        events: Vec<Event>,
    },
    /// Every change up to `revision` has been delivered (progress notification).
    Progress {
        /// The revision the watcher is up to date with.
        revision: i64,
    },
    /// The history the watcher needs has been compacted away: changes were missed. The watcher
    /// ends after this; re-read the keys and watch again from the read's revision + 1.
    Compacted {
        /// The compaction revision.
        compact_revision: i64,
    },
}

enum Ctl {
    Progress,
}

/// A resumable watch. Read it with [`Watcher::next`] (or as a `Stream`); dropping it cancels
/// the watch.
pub struct Watcher {
    rx: mpsc::Receiver<Result<WatchEvent>>,
    ctl: mpsc::UnboundedSender<Ctl>,
    task: tokio::task::JoinHandle<()>,
    next_rev: Arc<AtomicI64>,
    endpoint: Arc<std::sync::Mutex<String>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watcher {
    /// The next event; `None` once the watch ended (after `Compacted` or an error).
    pub async fn next(&mut self) -> Option<Result<WatchEvent>> {
        self.rx.recv().await
    }

    /// Asks the server for a [`WatchEvent::Progress`] now.
    pub fn request_progress(&self) -> Result<()> {
        self.ctl
            .send(Ctl::Progress)
            .map_err(|_| Error::Cancelled("watch ended".into()))
    }

    /// The revision the watch would resume from: one past the last delivered event or progress
    /// notification.
    pub fn next_revision(&self) -> i64 {
        self.next_rev.load(Ordering::Acquire)
    }

    /// The endpoint the watch stream currently uses (or last tried).
    pub fn endpoint(&self) -> String {
        self.endpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops the watch.
    pub fn cancel(self) {}
}

impl Stream for Watcher {
    type Item = Result<WatchEvent>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

fn convert_event(e: keel_proto::mvccpb::Event) -> Event {
    Event {
        kind: if e.r#type == EventType::Delete as i32 {
            EventKind::Delete
        } else {
            EventKind::Put
        },
        kv: e.kv.map(Into::into).unwrap_or_default(),
        prev_kv: e.prev_kv.map(Into::into),
    }
}

impl Client {
    /// Watches `key` (see [`WatchOptions`]). Returns once the server confirmed the watch, so
    /// every change after that is delivered.
    pub async fn watch(&self, key: impl Into<Vec<u8>>, opts: WatchOptions) -> Result<Watcher> {
        let key = key.into();
        let range_end = match (&opts.range_end, opts.prefix) {
            (Some(e), _) => e.clone(),
            (None, true) => prefix_end(&key),
            (None, false) => Vec::new(),
        };
        let key = if opts.prefix { prefix_key(key) } else { key };
        let mut filters = Vec::new();
        if opts.no_put {
            filters.push(FilterType::Noput as i32);
        }
        if opts.no_delete {
            filters.push(FilterType::Nodelete as i32);
        }
        let create = pb::WatchCreateRequest {
            key,
            range_end,
            start_revision: opts.start_revision,
            progress_notify: opts.progress_notify,
            filters,
            prev_kv: opts.prev_kv,
            watch_id: 0,
            fragment: false,
        };
        let (tx, rx) = mpsc::channel(256);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (created_tx, created_rx) = oneshot::channel();
        let next_rev = Arc::new(AtomicI64::new(opts.start_revision));
        let endpoint = Arc::new(std::sync::Mutex::new(String::new()));
        let task = tokio::spawn(run(
            self.clone(),
            create,
            tx,
            ctl_rx,
            created_tx,
            next_rev.clone(),
            endpoint.clone(),
        ));
        let watcher = Watcher {
            rx,
            ctl: ctl_tx,
            task,
            next_rev,
            endpoint,
        };
        match tokio::time::timeout(self.request_timeout(), created_rx).await {
            Ok(Ok(Ok(()))) => Ok(watcher),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(Error::Cancelled("watch task ended".into())),
            Err(_) => Err(Error::Timeout("watch not created in time".into())),
        }
    }
}

/// What ended one stream.
enum StreamEnd {
    /// Open a new stream (after a pause).
    Reconnect,
    /// The watch is over.
    Stop,
}

async fn run(
    client: Client,
    create: pb::WatchCreateRequest,
    tx: mpsc::Sender<Result<WatchEvent>>,
    mut ctl: mpsc::UnboundedReceiver<Ctl>,
    created: oneshot::Sender<Result<()>>,
    next_rev: Arc<AtomicI64>,
    endpoint: Arc<std::sync::Mutex<String>>,
) {
    let mut created = Some(created);
    let mut failures = 0u32;
    loop {
        let (idx, ch) = client.pick();
        *endpoint.lock().unwrap_or_else(PoisonError::into_inner) = client.endpoint_url(idx);
        let end = one_stream(
            &client,
            ch,
            &create,
            &tx,
            &mut ctl,
            &mut created,
            &next_rev,
            &mut failures,
        )
        .await;
        match end {
            StreamEnd::Stop => return,
            StreamEnd::Reconnect => {
                client.mark_down(idx);
                failures += 1;
                let pause = client.inner.opts.retry.backoff(failures.min(6));
                tracing::debug!(
                    ?pause,
                    next = next_rev.load(Ordering::Acquire),
                    "watch reconnecting"
                );
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn one_stream(
    client: &Client,
    ch: tonic::transport::Channel,
    create: &pb::WatchCreateRequest,
    tx: &mpsc::Sender<Result<WatchEvent>>,
    ctl: &mut mpsc::UnboundedReceiver<Ctl>,
    created: &mut Option<oneshot::Sender<Result<()>>>,
    next_rev: &AtomicI64,
    failures: &mut u32,
) -> StreamEnd {
    let fail = |created: &mut Option<oneshot::Sender<Result<()>>>, e: Error| {
        if let Some(c) = created.take() {
            let _ = c.send(Err(e));
            None
        } else {
            Some(e)
        }
    };
    let (req_tx, req_rx) = mpsc::channel::<pb::WatchRequest>(8);
    let mut create = create.clone();
    create.start_revision = next_rev.load(Ordering::Acquire);
    let _ = req_tx
        .send(pb::WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
        })
        .await;
    let mut wc = WatchClient::new(ch).max_decoding_message_size(MAX_MESSAGE);
    let mut stream = match wc
        .watch(client.stream_request(ReceiverStream::new(req_rx)))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(status) => {
            return match classify(&status) {
                Failure::NotSent | Failure::Transient => StreamEnd::Reconnect,
                Failure::BadToken if client.inner.opts.credentials.is_some() => {
                    let _ = client.authenticate(client.token_generation()).await;
                    StreamEnd::Reconnect
                }
                _ => {
                    if let Some(e) = fail(created, Error::from_status(&status)) {
                        let _ = tx.send(Err(e)).await;
                    }
                    StreamEnd::Stop
                }
            };
        }
    };
    let mut pending: Vec<Event> = Vec::new();
    loop {
        tokio::select! {
            c = ctl.recv() => match c {
                Some(Ctl::Progress) => {
                    let _ = req_tx.send(pb::WatchRequest {
                        request_union: Some(watch_request::RequestUnion::ProgressRequest(
                            pb::WatchProgressRequest {},
                        )),
                    }).await;
                }
                // The Watcher was dropped.
                None => return StreamEnd::Stop,
            },
            msg = stream.message() => {
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return StreamEnd::Reconnect,
                    Err(status) => {
                        return match classify(&status) {
                            Failure::Final => {
                                let e = Error::from_status(&status);
                                if let Some(e) = fail(created, e) {
                                    let _ = tx.send(Err(e)).await;
                                }
                                StreamEnd::Stop
                            }
                            _ => StreamEnd::Reconnect,
                        };
                    }
                };
                let header_rev = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
                if resp.created {
                    *failures = 0;
                    if next_rev.load(Ordering::Acquire) == 0 {
                        next_rev.store(header_rev + 1, Ordering::Release);
                    }
                    if !resp.canceled
                        && let Some(c) = created.take()
                    {
                        let _ = c.send(Ok(()));
                    }
                }
                if resp.canceled {
                    if resp.compact_revision > 0 {
                        let ev = WatchEvent::Compacted { compact_revision: resp.compact_revision };
                        if let Some(c) = created.take() {
                            let _ = c.send(Ok(()));
                        }
                        let _ = tx.send(Ok(ev)).await;
                        return StreamEnd::Stop;
                    }
                    let reason = resp.cancel_reason;
                    if reason.contains("no leader") {
                        return StreamEnd::Reconnect;
                    }
                    if let Some(e) = fail(created, Error::WatchCanceled(reason)) {
                        let _ = tx.send(Err(e)).await;
                    }
                    return StreamEnd::Stop;
                }
                if resp.created {
                    continue;
                }
                let expected = next_rev.load(Ordering::Acquire);
                let had_events = !resp.events.is_empty();
                pending.extend(
                    resp.events
                        .into_iter()
                        .map(convert_event)
                        // Already delivered before a reconnect.
                        .filter(|e| e.kv.mod_revision >= expected),
                );
                if resp.fragment {
                    continue;
                }
                let ev = if !pending.is_empty() {
                    let last = pending.last().map(|e| e.kv.mod_revision).unwrap_or(0);
                    next_rev.store(last + 1, Ordering::Release);
                    WatchEvent::Events {
                        revision: header_rev,
                        events: std::mem::take(&mut pending),
                    }
                } else if had_events {
                    // Only events delivered before a reconnect.
                    continue;
                } else {
                    // A progress notification.
                    let rev = header_rev.max(expected - 1);
                    next_rev.store(rev + 1, Ordering::Release);
                    WatchEvent::Progress { revision: rev }
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return StreamEnd::Stop;
                }
            }
        }
    }
}
