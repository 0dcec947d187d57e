//! `etcdserverpb.Watch`: many watchers multiplexed on each bidirectional stream, fed from this
//! member's applied state.
//!
//! Design (after etcd's watchable store):
//! - The [`WatchHub`] receives every applied chunk's events from the state machine (in revision
//!   order, after they are durable) and hands them to **synced** watchers — those that have seen
//!   everything up to the last dispatched revision — by pushing responses onto their stream's
//!   queue. An event's watchers are found through an index of keys and prefixes
//!   ([`crate::watch_index`]); only other ranges are scanned.
//! - A watcher that starts in the past, or whose stream queue is full (a slow consumer; full is
//!   1 024 responses or 64 MiB of them, as a response can carry many events), is **unsynced**:
//!   the syncer task replays its missing revisions from the MVCC history, in steps of about
//!   1 MiB while its stream's queue is at most half full, and moves it back to synced once it
//!   has caught up with the dispatched revision. Writers and other watchers never wait for a
//!   slow watcher; a victim only falls back to history. Unsynced watchers of the same range
//!   share each step's read and its encoded events (see `WatchHub::sync_once`).
//! - Each stream's queue is a FIFO, so per watcher responses are in revision order, all events
//!   of a revision travel in one response (unless the watcher asked for fragmentation), and a
//!   progress response is queued only when every watcher of the stream is synced — so its header
//!   revision never claims a revision whose events are still undelivered.
//! - tonic's encoder takes everything a stream has queued at once (`QueueStream`), so a
//!   revision's responses for many watchers of one stream go out in one write; a watcher that
//!   has several revisions queued gets them merged into one response (whole revisions, never
//!   past a control response; see `coalesce`).
//! - The state machine answers a chunk's writers before it hands the chunk to the hub, so a
//!   writer never waits for the fan-out of its own events. A watch from "the next revision"
//!   therefore starts after the store's applied revision, not the hub's dispatched one (which
//!   may lag by the chunk being handed over), and waits unsynced until dispatch catches up.
//! - Every revision bump produces at least one event, so a chunk that skips revisions (after a
//!   Raft snapshot was installed) is detected and synced watchers fall back to history rather
//!   than silently miss events.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};
use keel_proto::etcdserverpb::watch_request::RequestUnion;
use keel_proto::etcdserverpb::{
    ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse, watch_create_request,
};
use keel_proto::mvccpb::{Event, event::EventType};
use keel_store::ApplyErrorKind;
use keel_store::mvcc::{HistoryRequest, MvccStore};
use keel_store::raft::state_machine::AppliedChunk;
use prost::Message;
use tokio::sync::{Notify, OnceCell};
use tonic::{Request, Response, Status, Streaming};

use crate::error::ServerError;
use crate::node::KeelNode;
use crate::watch_index::{KeyRange, WatcherIndex};

/// Responses a stream may have queued before its watchers become victims.
const STREAM_QUEUE_CAPACITY: usize = 1024;
/// Wire bytes of event responses a stream may have queued before its watchers become victims
/// (unless the hub was made with [`WatchHub::with_stream_queue_bytes`]). A response can carry a
/// whole applied chunk or catch-up step, so a count alone does not bound a slow stream's memory.
pub const STREAM_QUEUE_BYTES: usize = 64 << 20;
/// Events replayed from history per catch-up step (batches end on a revision boundary).
const CATCH_UP_EVENTS: usize = 4096;
/// Bytes of keys and values replayed from history per catch-up step, at most about (the step
/// ends at the first revision boundary past it).
const CATCH_UP_BYTES: usize = 1 << 20;
const INVALID_WATCH_ID: i64 = -1;

/// An unsynced watcher in a catch-up pass: the hub's key for it, its stream, and the revision
/// it needs next when the pass began.
struct CatchUpMember {
    key: u64,
    stream: u64,
    next_rev: i64,
}

struct Watcher {
    stream: u64,
    watch_id: i64,
    range: KeyRange,
    /// The first revision this watcher has not been sent yet. While the watcher is synced
    /// this is only a lower bound, kept current when it receives events: every revision up to
    /// the hub's `dispatched_rev` has been offered to it, and the revisions between its
    /// `next_rev` and `dispatched_rev` held nothing it wanted. (Dispatch does not walk every
    /// watcher to advance it, which cost O(watchers) per applied chunk; the bound is made
    /// exact when the watcher leaves the synced set, in `HubState::mark_unsynced`.)
    next_rev: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    fragment: bool,
    synced: bool,
    sent_since_tick: bool,
}

impl Watcher {
    fn wants(&self, ev: &Event) -> bool {
        self.wants_in_range(ev)
            && ev
                .kv
                .as_ref()
                .is_some_and(|kv| self.range.contains(&kv.key))
    }

    /// [`Watcher::wants`] for an event already known to be in the watcher's range (found
    /// through the hub's [`WatcherIndex`]).
    fn wants_in_range(&self, ev: &Event) -> bool {
        let is_delete = ev.r#type == EventType::Delete as i32;
        if (is_delete && self.no_delete) || (!is_delete && self.no_put) {
            return false;
        }
        ev.kv
            .as_ref()
            .is_some_and(|kv| kv.mod_revision >= self.next_rev)
    }

    /// The event as this watcher receives it. An event has two shapes (with and without
    /// `prev_kv`); each is built and encoded on first use and shared by every watcher that
    /// receives it, so fanning an event out to a watcher costs a reference count.
    fn shape(&self, ev: &Event, shapes: &mut EventShapes, hub: &WatchHub) -> Arc<SharedEvent> {
        if self.prev_kv {
            shapes
                .with_prev
                .get_or_insert_with(|| Arc::new(SharedEvent::new(hub.with_prev_kv(ev))))
                .clone()
        } else {
            shapes
                .plain
                .get_or_insert_with(|| {
                    Arc::new(SharedEvent::new(Event {
                        r#type: ev.r#type,
                        kv: ev.kv.clone(),
                        prev_kv: None,
                    }))
                })
                .clone()
        }
    }
}

/// An event as watchers receive it, with its protobuf encoding made once for all of them.
#[derive(Debug)]
pub struct SharedEvent {
    pub event: Event,
    pub encoded: Vec<u8>,
}

impl SharedEvent {
    pub fn new(event: Event) -> SharedEvent {
        let encoded = event.encode_to_vec();
        SharedEvent { event, encoded }
    }
}

/// The shapes of one event built so far during a dispatch.
#[derive(Default)]
struct EventShapes {
    plain: Option<Arc<SharedEvent>>,
    with_prev: Option<Arc<SharedEvent>>,
}

/// What [`WatchHub::counts`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubCounts {
    /// Watchers on this member.
    pub watchers: usize,
    /// Of those, the ones catching up from history.
    pub unsynced: usize,
    /// Watch streams open (clients' and the lock and election services' own).
    pub streams: usize,
    /// Events queued on the streams and not sent yet.
    pub pending_events: usize,
    /// Their responses' bytes, as counted against each stream's queue limit.
    pub pending_bytes: usize,
}

/// Events sent to clients' watch streams by this process (`etcd_debugging_mvcc_events_total`).
static EVENTS_SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Events sent to clients' watch streams so far.
pub fn events_sent() -> u64 {
    EVENTS_SENT.load(Ordering::Relaxed)
}

/// One queued response of a watch stream.
#[derive(Debug)]
pub enum Outgoing {
    /// A response built whole (created, canceled, progress); boxed, as these are rare and
    /// much larger than an event response.
    Response(Box<WatchResponse>),
    /// A watcher's events: encoded on the wire from the shared encodings.
    Events {
        watch_id: i64,
        header_rev: i64,
        fragment: bool,
        events: EventList,
    },
}

/// A response's events: one when writes come one at a time, a chunk's worth (about four at
/// 8 writers) when they are batched; up to four are kept without a heap allocation.
pub type EventList = smallvec::SmallVec<[Arc<SharedEvent>; 4]>;

/// A watcher's responses for one revision or catch-up step; one unless fragmented.
type Responses = smallvec::SmallVec<[Outgoing; 1]>;

impl Outgoing {
    /// The response as a message (for in-process watchers and tests); the header carries only
    /// the revision, as queued.
    pub fn into_response(self) -> WatchResponse {
        match self {
            Outgoing::Response(r) => *r,
            Outgoing::Events {
                watch_id,
                header_rev,
                fragment,
                events,
            } => WatchResponse {
                header: Some(rev_header(header_rev)),
                watch_id,
                fragment,
                events: events.iter().map(|e| e.event.clone()).collect(),
                ..Default::default()
            },
        }
    }

    /// The response's wire encoding (a `WatchResponse`), with `header`'s member fields and the
    /// queued revision.
    pub fn encode(self, header: &ResponseHeader) -> Vec<u8> {
        let mut buf = Vec::new();
        self.encode_to(header, &mut buf);
        buf
    }

    /// At least the length of the response's encoding (for reserving buffer room; not exact
    /// for event responses: the header's fields are counted at their longest).
    pub fn encoded_len_bound(&self) -> usize {
        // A header: key, length, four varint fields of up to 10 bytes and their keys.
        const HEADER: usize = 2 + 4 * 11;
        match self {
            // The member's header fields are filled in when it is encoded.
            Outgoing::Response(r) => r.encoded_len() + HEADER,
            Outgoing::Events { events, .. } => {
                // header, watch_id, fragment
                HEADER
                    + 11
                    + 2
                    + events
                        .iter()
                        .map(|e| 1 + prost::length_delimiter_len(e.encoded.len()) + e.encoded.len())
                        .sum::<usize>()
            }
        }
    }

    /// The bytes an event response counts against its stream's queue limit (an upper bound of
    /// its encoding, as [`event_responses`] sizes fragments); 0 for a control response, which
    /// is always queued.
    fn queued_bytes(&self) -> usize {
        match self {
            Outgoing::Response(_) => 0,
            Outgoing::Events { events, .. } => {
                RESPONSE_OVERHEAD + events.iter().map(event_wire_size).sum::<usize>()
            }
        }
    }

    /// [`Outgoing::encode`] into `buf`: event encodings are copied, not re-encoded.
    pub fn encode_to(self, header: &ResponseHeader, buf: &mut impl bytes::BufMut) {
        use prost::encoding::{WireType, encode_key, encode_varint};
        match self {
            Outgoing::Response(mut r) => {
                if let Some(h) = r.header.as_mut() {
                    h.cluster_id = header.cluster_id;
                    h.member_id = header.member_id;
                    h.raft_term = header.raft_term;
                }
                r.encode_raw(buf);
            }
            Outgoing::Events {
                watch_id,
                header_rev,
                fragment,
                events,
            } => {
                let header = ResponseHeader {
                    revision: header_rev,
                    ..*header
                };
                prost::encoding::message::encode(1, &header, buf);
                if watch_id != 0 {
                    prost::encoding::int64::encode(2, &watch_id, buf);
                }
                if fragment {
                    prost::encoding::bool::encode(7, &fragment, buf);
                }
                for e in &events {
                    encode_key(11, WireType::LengthDelimited, buf);
                    encode_varint(e.encoded.len() as u64, buf);
                    buf.put_slice(&e.encoded);
                }
            }
        }
    }
}

/// A stream's outgoing responses. Control responses are always queued; event responses only
/// while the queue is below capacity (`Queued::has_room`).
pub struct StreamQueue {
    queue: Mutex<Queued>,
    consumer: Consumer,
    /// Wakes an in-process consumer ([`InternalWatch`]).
    notify: Notify,
    /// Wakes a gRPC stream's `QueueStream`.
    waker: AtomicWaker,
    closed: AtomicBool,
}

/// Who reads a stream's queue, and so which of its wake-ups to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consumer {
    Grpc,
    InProcess,
}

/// What a stream has queued, and the wire bytes of its event responses.
#[derive(Default)]
struct Queued {
    items: VecDeque<Outgoing>,
    /// [`Outgoing::queued_bytes`] of the event responses in `items`.
    event_bytes: usize,
}

impl Queued {
    /// Whether `count` more event responses of `bytes` fit: within [`STREAM_QUEUE_CAPACITY`]
    /// responses and `max_bytes` bytes, or anything when the queue is empty (so a response
    /// larger than the limit still gets through once the consumer has read the rest).
    fn has_room(&self, count: usize, bytes: usize, max_bytes: usize) -> bool {
        self.items.is_empty()
            || (self.items.len() + count <= STREAM_QUEUE_CAPACITY
                && self.event_bytes + bytes <= max_bytes)
    }

    /// Queues event responses of `bytes` ([`Outgoing::queued_bytes`], summed).
    fn push_events(&mut self, resps: Responses, bytes: usize) {
        self.event_bytes += bytes;
        self.items.extend(resps);
    }

    fn pop_front(&mut self) -> Option<Outgoing> {
        let out = self.items.pop_front()?;
        self.event_bytes = self.event_bytes.saturating_sub(out.queued_bytes());
        Some(out)
    }

    fn take_all(&mut self) -> Vec<Outgoing> {
        self.event_bytes = 0;
        self.items.drain(..).collect()
    }
}

impl StreamQueue {
    fn lock(&self) -> MutexGuard<'_, Queued> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new(consumer: Consumer) -> StreamQueue {
        StreamQueue {
            queue: Mutex::new(Queued::default()),
            consumer,
            notify: Notify::new(),
            waker: AtomicWaker::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Tells the consumer that responses were queued (or the queue closed).
    fn wake(&self) {
        match self.consumer {
            Consumer::Grpc => self.waker.wake(),
            Consumer::InProcess => self.notify.notify_one(),
        }
    }

    fn push(&self, resp: WatchResponse) {
        self.lock()
            .items
            .push_back(Outgoing::Response(Box::new(resp)));
        self.wake();
    }

    /// Queues a catch-up step's responses unless that would pass the count limit. Their bytes
    /// are not checked here: the step was read only because the stream had room
    /// ([`HubState::stream_has_room`]) and is sized to fit it (see `sync_once`), and refusing a
    /// step that is a little over would have the syncer read it again and again.
    fn try_push_catch_up(&self, resps: Responses, bytes: usize) -> bool {
        let mut q = self.lock();
        if !q.items.is_empty() && q.items.len() + resps.len() > STREAM_QUEUE_CAPACITY {
            return false;
        }
        q.push_events(resps, bytes);
        drop(q);
        self.wake();
        true
    }

    /// Ends the stream once what is queued has been sent.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

struct StreamEntry {
    queue: Arc<StreamQueue>,
    /// The stream's watchers: watch id → the hub's key of the watcher.
    watchers: BTreeMap<i64, u64>,
    next_watch_id: i64,
}

#[derive(Default)]
struct HubState {
    dispatched_rev: i64,
    next_key: u64,
    next_stream: u64,
    watchers: BTreeMap<u64, Watcher>,
    /// Watchers by key range, to find those an event concerns.
    index: WatcherIndex,
    unsynced: BTreeSet<u64>,
    streams: BTreeMap<u64, StreamEntry>,
    /// Streams whose progress request waits for their watchers to be synced.
    progress_waiting: BTreeSet<u64>,
}

impl HubState {
    fn mark_unsynced(&mut self, key: u64) {
        let dispatched = self.dispatched_rev;
        if let Some(w) = self.watchers.get_mut(&key) {
            if w.synced {
                // A synced watcher has seen every dispatched revision, whatever its
                // `next_rev` still says (see `Watcher::next_rev`).
                w.next_rev = w.next_rev.max(dispatched + 1);
            }
            w.synced = false;
            self.unsynced.insert(key);
        }
    }

    /// Moves an unsynced watcher back to the synced ones if it needs nothing older than the
    /// next revision to be dispatched.
    fn mark_synced_if_current(&mut self, key: u64) {
        let current = self.dispatched_rev;
        if let Some(w) = self.watchers.get_mut(&key)
            && w.next_rev == current + 1
        {
            w.synced = true;
            self.unsynced.remove(&key);
        }
    }

    fn remove_watcher(&mut self, key: u64) -> Option<Watcher> {
        let w = self.watchers.remove(&key)?;
        self.index.remove(key, &w.range);
        self.unsynced.remove(&key);
        if let Some(s) = self.streams.get_mut(&w.stream) {
            s.watchers.remove(&w.watch_id);
        }
        Some(w)
    }

    fn stream_all_synced(&self, stream: u64) -> bool {
        self.streams
            .get(&stream)
            .is_some_and(|s| s.watchers.values().all(|k| !self.unsynced.contains(k)))
    }

    /// Whether a stream's queue can take a catch-up batch: at most half full, in responses and
    /// in bytes (a consumer that is not reading is left alone until it drains, instead of
    /// re-reading history for it in a loop).
    fn stream_has_room(&self, stream: u64, max_bytes: usize) -> bool {
        self.streams.get(&stream).is_some_and(|s| {
            let q = s.queue.lock();
            q.items.len() < STREAM_QUEUE_CAPACITY / 2 && q.event_bytes < max_bytes / 2
        })
    }

    fn progress_response(&self, watch_id: i64) -> WatchResponse {
        WatchResponse {
            header: Some(rev_header(self.dispatched_rev)),
            watch_id,
            ..Default::default()
        }
    }
}

fn rev_header(revision: i64) -> ResponseHeader {
    ResponseHeader {
        revision,
        ..Default::default()
    }
}

/// An upper bound of a response's bytes besides its events (header, watch ID, flags).
const RESPONSE_OVERHEAD: usize = 64;

/// An upper bound of the bytes an event adds to a response (its encoding, tag and length).
fn event_wire_size(e: &Arc<SharedEvent>) -> usize {
    e.encoded.len() + 8
}

/// A watcher's events as responses: one, or (when the watcher allows fragmenting and they do
/// not fit in `limit` bytes) several, all but the last marked `fragment`; with their
/// [`Outgoing::queued_bytes`], summed.
fn event_responses(
    watch_id: i64,
    header_rev: i64,
    events: EventList,
    fragment: bool,
    limit: usize,
) -> (Responses, usize) {
    let whole: usize = RESPONSE_OVERHEAD + events.iter().map(event_wire_size).sum::<usize>();
    let batch = |events, fragment| Outgoing::Events {
        watch_id,
        header_rev,
        fragment,
        events,
    };
    if !fragment || whole <= limit {
        return (smallvec::smallvec![batch(events, false)], whole);
    }
    let mut out = Responses::new();
    let mut current = EventList::new();
    let mut used = RESPONSE_OVERHEAD;
    for ev in events {
        let len = event_wire_size(&ev);
        if !current.is_empty() && used + len > limit {
            out.push(batch(std::mem::take(&mut current), true));
            used = RESPONSE_OVERHEAD;
        }
        used += len;
        current.push(ev);
    }
    out.push(batch(current, false));
    let bytes = whole + (out.len() - 1) * RESPONSE_OVERHEAD;
    (out, bytes)
}

/// A stream's drained responses with each watcher's event responses merged: between two
/// control responses (created, canceled, progress), the event responses of one watcher become
/// one response carrying their events in order (whole revisions, so a revision is never split)
/// and the last one's header revision, as long as it stays within `limit` bytes. Watchers are
/// independent, so a merged response may move ahead of other watchers' responses; it never
/// moves past a control response. Parts of a fragmented revision are left as they are.
///
/// A watcher behind by several revisions then costs one response (one header, one gRPC
/// message, one decode at the client) instead of one per revision; etcd sends its catch-up
/// batches the same way.
fn coalesce(batch: Vec<Outgoing>, limit: usize) -> Vec<Outgoing> {
    // One revision's responses (the common case when watchers keep up): no watcher has two.
    let mut revisions = batch.iter().filter_map(|o| match o {
        Outgoing::Events { header_rev, .. } => Some(*header_rev),
        Outgoing::Response(_) => None,
    });
    let first = revisions.next();
    if batch.len() < 2 || revisions.all(|r| Some(r) == first) {
        return batch;
    }
    let mut out: Vec<Outgoing> = Vec::with_capacity(batch.len());
    // Watch ID → (index in `out` of its response that can still take events, its size).
    let mut open: HashMap<i64, (usize, usize)> = HashMap::new();
    // Watchers whose last response was a fragment: their next one ends that revision.
    let mut fragmenting: HashSet<i64> = HashSet::new();
    for item in batch {
        let Outgoing::Events {
            watch_id,
            header_rev,
            fragment,
            events,
        } = item
        else {
            open.clear();
            out.push(item);
            continue;
        };
        let size: usize = events.iter().map(event_wire_size).sum();
        if fragment || fragmenting.remove(&watch_id) {
            if fragment {
                fragmenting.insert(watch_id);
            }
            open.remove(&watch_id);
            out.push(Outgoing::Events {
                watch_id,
                header_rev,
                fragment,
                events,
            });
            continue;
        }
        if let Some((index, used)) = open.get_mut(&watch_id)
            && *used + size <= limit
            && let Some(Outgoing::Events {
                header_rev: merged_rev,
                events: merged,
                ..
            }) = out.get_mut(*index)
        {
            merged.extend(events);
            *merged_rev = header_rev;
            *used += size;
            continue;
        }
        open.insert(watch_id, (out.len(), RESPONSE_OVERHEAD + size));
        out.push(Outgoing::Events {
            watch_id,
            header_rev,
            fragment,
            events,
        });
    }
    out
}

/// All watchers of one member.
pub struct WatchHub {
    state: Mutex<HubState>,
    mvcc: OnceCell<Arc<MvccStore>>,
    sync_wanted: Notify,
    max_response_bytes: usize,
    progress_interval: Duration,
    /// Bytes of event responses a stream may have queued ([`STREAM_QUEUE_BYTES`] unless set
    /// with [`WatchHub::with_stream_queue_bytes`]).
    stream_queue_bytes: usize,
    /// Times a synced watcher found its stream's queue full and fell back to history.
    pub victims: AtomicU64,
    /// Events sent from history (watchers starting in the past, and victims catching up).
    pub catch_up_events: AtomicU64,
    /// History reads made for them (one serves every watcher of a range that needs the step).
    pub catch_up_reads: AtomicU64,
}

impl WatchHub {
    pub fn new(max_response_bytes: usize, progress_interval: Duration) -> Arc<WatchHub> {
        Self::with_stream_queue_bytes(max_response_bytes, progress_interval, STREAM_QUEUE_BYTES)
    }

    /// [`WatchHub::new`] with another limit of the bytes a stream may have queued.
    pub fn with_stream_queue_bytes(
        max_response_bytes: usize,
        progress_interval: Duration,
        stream_queue_bytes: usize,
    ) -> Arc<WatchHub> {
        Arc::new(WatchHub {
            state: Mutex::new(HubState::default()),
            mvcc: OnceCell::new(),
            sync_wanted: Notify::new(),
            max_response_bytes,
            progress_interval,
            stream_queue_bytes,
            victims: AtomicU64::new(0),
            catch_up_events: AtomicU64::new(0),
            catch_up_reads: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connects the hub to the store once it is open, and starts the syncer and progress tasks.
    pub fn attach(self: &Arc<Self>, mvcc: Arc<MvccStore>) {
        {
            let mut st = self.lock();
            st.dispatched_rev = st.dispatched_rev.max(mvcc.current_revision());
        }
        let _ = self.mvcc.set(mvcc);
        let weak = Arc::downgrade(self);
        tokio::spawn(syncer(weak.clone()));
        tokio::spawn(progress_ticker(weak, self.progress_interval));
    }

    /// Called by the state machine after each applied chunk.
    pub fn on_applied(&self, chunk: &AppliedChunk) {
        if chunk.installed_snapshot {
            // The revisions the snapshot brought are noticed at the next chunk (a gap).
            return;
        }
        let mut st = self.lock();
        let first_rev = chunk
            .events
            .first()
            .and_then(|e| e.kv.as_ref())
            .map(|kv| kv.mod_revision);
        let gap = match first_rev {
            Some(r) => r > st.dispatched_rev + 1,
            None => chunk.applied.revision > st.dispatched_rev,
        };
        if gap && st.dispatched_rev > 0 {
            // Revisions arrived that were never dispatched (a snapshot was installed): every
            // synced watcher must replay them from history.
            let keys: Vec<u64> = st
                .watchers
                .iter()
                .filter(|(_, w)| w.synced)
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                st.mark_unsynced(k);
            }
        }
        if !chunk.events.is_empty() {
            self.dispatch(&mut st, chunk);
        }
        st.dispatched_rev = st.dispatched_rev.max(chunk.applied.revision);
        let wake = !st.unsynced.is_empty() || !st.progress_waiting.is_empty();
        drop(st);
        if wake {
            self.sync_wanted.notify_one();
        }
    }

    fn dispatch(&self, st: &mut HubState, chunk: &AppliedChunk) {
        // (stream, watcher, event) for every delivery, in event order; grouped per stream and
        // watcher below.
        let mut deliveries: Vec<(u64, u64, Arc<SharedEvent>)> = Vec::new();
        for ev in &chunk.events {
            let Some(kv) = ev.kv.as_ref() else { continue };
            if kv.mod_revision <= st.dispatched_rev {
                // Synced watchers have been offered it already.
                continue;
            }
            let mut shapes = EventShapes::default();
            st.index.for_each_containing(&kv.key, |k| {
                if let Some(w) = st.watchers.get(&k)
                    && w.synced
                    && w.wants_in_range(ev)
                {
                    deliveries.push((w.stream, k, w.shape(ev, &mut shapes, self)));
                }
            });
        }
        let header_rev = chunk.applied.revision;
        // A stable sort keeps each watcher's events in revision order.
        if !deliveries.is_sorted_by_key(|(stream, key, _)| (*stream, *key)) {
            deliveries.sort_by_key(|(stream, key, _)| (*stream, *key));
        }
        let HubState {
            watchers,
            streams,
            unsynced,
            ..
        } = &mut *st;
        let mut deliveries = deliveries.into_iter().peekable();
        while let Some(&(stream, _, _)) = deliveries.peek() {
            // A stream's responses are pushed under one lock and with one wake-up, so its
            // consumer finds the whole revision queued.
            let queue = streams.get(&stream).map(|s| &s.queue);
            let mut queued = queue.map(|q| q.lock());
            let mut pushed = false;
            while let Some((_, key, first)) = deliveries.next_if(|(s, _, _)| *s == stream) {
                let mut events: EventList = smallvec::smallvec![first];
                while let Some((_, _, e)) =
                    deliveries.next_if(|(s, k, _)| *s == stream && *k == key)
                {
                    events.push(e);
                }
                let Some(w) = watchers.get_mut(&key) else {
                    continue;
                };
                let first = events
                    .first()
                    .and_then(|e| e.event.kv.as_ref())
                    .map(|kv| kv.mod_revision)
                    .unwrap_or(header_rev);
                let (resps, bytes) = event_responses(
                    w.watch_id,
                    header_rev,
                    events,
                    w.fragment,
                    self.max_response_bytes,
                );
                let delivered = match queued.as_mut() {
                    Some(q) if q.has_room(resps.len(), bytes, self.stream_queue_bytes) => {
                        q.push_events(resps, bytes);
                        true
                    }
                    _ => false,
                };
                pushed |= delivered;
                if delivered {
                    w.next_rev = header_rev + 1;
                    w.sent_since_tick = true;
                } else {
                    // A slow consumer: it will catch up from history, nobody waits for it.
                    w.next_rev = first;
                    w.synced = false;
                    unsynced.insert(key);
                    self.victims.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(queued);
            if pushed && let Some(q) = queue {
                q.wake();
            }
        }
    }

    /// `ev` with its `prev_kv`: applied events leave it empty unless the write read it, so it
    /// is read here (once per event, for the watchers that asked) as etcd's watch does.
    fn with_prev_kv(&self, ev: &Event) -> Event {
        let mut out = ev.clone();
        if out.prev_kv.is_some() {
            return out;
        }
        let (Some(kv), Some(mvcc)) = (ev.kv.as_ref(), self.mvcc.get()) else {
            return out;
        };
        let is_delete = ev.r#type == EventType::Delete as i32;
        match mvcc.replaced_version(kv, is_delete) {
            Ok(prev) => out.prev_kv = prev,
            Err(e) => tracing::warn!("watch: reading an event's prev_kv failed: {e}"),
        }
        out
    }

    fn open_stream(&self, consumer: Consumer) -> (u64, Arc<StreamQueue>) {
        let mut st = self.lock();
        st.next_stream += 1;
        let id = st.next_stream;
        let queue = Arc::new(StreamQueue::new(consumer));
        st.streams.insert(
            id,
            StreamEntry {
                queue: queue.clone(),
                watchers: BTreeMap::new(),
                next_watch_id: 0,
            },
        );
        (id, queue)
    }

    fn close_stream(&self, stream: u64) {
        let mut st = self.lock();
        st.progress_waiting.remove(&stream);
        if let Some(entry) = st.streams.remove(&stream) {
            entry.queue.close();
            for k in entry.watchers.into_values() {
                st.remove_watcher(k);
            }
        }
    }

    /// Refuses a create request with `reason` (etcd: a created-and-canceled response).
    fn reject(&self, stream: u64, reason: &str) {
        let st = self.lock();
        let current = st.dispatched_rev;
        if let Some(entry) = st.streams.get(&stream) {
            entry.queue.push(WatchResponse {
                header: Some(rev_header(current)),
                watch_id: INVALID_WATCH_ID,
                created: true,
                canceled: true,
                cancel_reason: reason.to_string(),
                ..Default::default()
            });
        }
    }

    fn create(&self, stream: u64, req: WatchCreateRequest) {
        let mut st = self.lock();
        let current = st.dispatched_rev;
        let Some(entry) = st.streams.get(&stream) else {
            return;
        };
        let queue = entry.queue.clone();
        let reject = |reason: &str| WatchResponse {
            header: Some(rev_header(current)),
            watch_id: INVALID_WATCH_ID,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        };
        let Some(range) = KeyRange::from_request(&req.key, &req.range_end) else {
            queue.push(reject("mvcc: watcher range is empty"));
            return;
        };
        let Some(entry) = st.streams.get_mut(&stream) else {
            return;
        };
        let watch_id = if req.watch_id != 0 {
            // Any other ID the client picks is its own, negative ones included (as etcd).
            if entry.watchers.contains_key(&req.watch_id) {
                queue.push(reject(
                    "mvcc: duplicate watch ID provided on the WatchStream",
                ));
                return;
            }
            req.watch_id
        } else {
            let mut id = entry.next_watch_id;
            while entry.watchers.contains_key(&id) {
                id += 1;
            }
            entry.next_watch_id = id + 1;
            id
        };
        let filters: Vec<i32> = req.filters.clone();
        // "From the next revision" means after what this member has applied. A writer is
        // answered before its revision's events are dispatched (the state machine calls the
        // hub after answering), so a watch it creates at once must not receive them: such a
        // watcher starts after the applied revision, says so in its created response, and
        // waits unsynced until dispatch has caught up (see `sync_once`).
        let (start, created_rev) = if req.start_revision <= 0 {
            let applied = self.mvcc.get().map_or(current, |m| m.current_revision());
            let now = current.max(applied);
            (now + 1, now)
        } else {
            (req.start_revision, current)
        };
        let synced = start == current + 1;
        st.next_key += 1;
        let key = st.next_key;
        let watcher = Watcher {
            stream,
            watch_id,
            range: range.clone(),
            next_rev: start,
            prev_kv: req.prev_kv,
            no_put: filters.contains(&(watch_create_request::FilterType::Noput as i32)),
            no_delete: filters.contains(&(watch_create_request::FilterType::Nodelete as i32)),
            progress_notify: req.progress_notify,
            fragment: req.fragment,
            synced,
            sent_since_tick: false,
        };
        // The created response is queued before the watcher can receive anything.
        queue.push(WatchResponse {
            header: Some(rev_header(created_rev)),
            watch_id,
            created: true,
            ..Default::default()
        });
        st.index.insert(key, &range);
        st.watchers.insert(key, watcher);
        if let Some(entry) = st.streams.get_mut(&stream) {
            entry.watchers.insert(watch_id, key);
        }
        if !synced {
            st.unsynced.insert(key);
            drop(st);
            self.sync_wanted.notify_one();
        }
    }

    fn cancel(&self, stream: u64, watch_id: i64) {
        let mut st = self.lock();
        let Some(entry) = st.streams.get(&stream) else {
            return;
        };
        let queue = entry.queue.clone();
        let Some(key) = entry.watchers.get(&watch_id).copied() else {
            return;
        };
        st.remove_watcher(key);
        let current = st.dispatched_rev;
        queue.push(WatchResponse {
            header: Some(rev_header(current)),
            watch_id,
            canceled: true,
            ..Default::default()
        });
    }

    fn request_progress(&self, stream: u64) {
        let mut st = self.lock();
        if st.stream_all_synced(stream) {
            let resp = st.progress_response(INVALID_WATCH_ID);
            if let Some(s) = st.streams.get(&stream) {
                s.queue.push(resp);
            }
        } else if st.streams.contains_key(&stream) {
            st.progress_waiting.insert(stream);
            drop(st);
            self.sync_wanted.notify_one();
        }
    }

    /// One pass of the syncer: replays history for every unsynced watcher.
    ///
    /// Watchers of the same range and `prev_kv` choice are caught up together, as etcd's
    /// syncer reads history once for up to 512 of its unsynced watchers: sorted by the revision
    /// each needs next, the lowest one's step is read, its events are encoded once and shared,
    /// and every watcher whose next revision falls inside that step takes the events from its
    /// own next revision on. A watcher further ahead gets a read of its own in the same pass,
    /// so none waits for another to catch up. A hundred victims of one slow stream on one
    /// prefix thus cost one read per step, not a hundred.
    fn sync_once(&self) {
        let Some(mvcc) = self.mvcc.get() else { return };
        let (groups, upto) = {
            let st = self.lock();
            let mut groups: BTreeMap<(KeyRange, bool), Vec<CatchUpMember>> = BTreeMap::new();
            for k in &st.unsynced {
                let Some(w) = st.watchers.get(k) else {
                    continue;
                };
                if !st.stream_has_room(w.stream, self.stream_queue_bytes) {
                    continue;
                }
                groups
                    .entry((w.range.clone(), w.prev_kv))
                    .or_default()
                    .push(CatchUpMember {
                        key: *k,
                        stream: w.stream,
                        next_rev: w.next_rev,
                    });
            }
            (groups, st.dispatched_rev)
        };
        // A step is at most half a stream's byte limit (and one revision more), and is only
        // queued on a stream that is at most half full, so catch-up keeps a stream within its
        // limit.
        let step_bytes = CATCH_UP_BYTES.min(self.stream_queue_bytes / 2).max(1);
        for ((range, prev_kv), mut members) in groups {
            members.sort_by_key(|m| (m.next_rev, m.key));
            let mut i = 0;
            while i < members.len() {
                let from = members[i].next_rev;
                if from > upto {
                    // Nothing to replay (or a future start revision not reached yet).
                    let mut st = self.lock();
                    for m in &members[i..] {
                        st.mark_synced_if_current(m.key);
                    }
                    break;
                }
                // Earlier reads of this pass may have filled the stream.
                if !self
                    .lock()
                    .stream_has_room(members[i].stream, self.stream_queue_bytes)
                {
                    i += 1;
                    continue;
                }
                let (k, end) = range.to_request();
                self.catch_up_reads.fetch_add(1, Ordering::Relaxed);
                let hist = mvcc.history(&HistoryRequest {
                    start_revision: from,
                    end_revision: upto,
                    key: k,
                    range_end: end,
                    prev_kv,
                    max_events: CATCH_UP_EVENTS,
                    max_bytes: step_bytes,
                });
                match hist {
                    Err(e) if e.kind == ApplyErrorKind::Compacted => {
                        // Those that need a compacted revision are canceled; the others are
                        // caught up in the next pass.
                        let compacted = mvcc.compact_revision();
                        for m in members[i..].iter().filter(|m| m.next_rev < compacted) {
                            self.cancel_compacted(m, compacted);
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watch catch-up failed; will retry");
                        break;
                    }
                    Ok(batch) => {
                        let window_end = batch.next_revision;
                        // History was read with the group's prev_kv choice already.
                        let events: Vec<Arc<SharedEvent>> = batch
                            .events
                            .into_iter()
                            .map(|ev| Arc::new(SharedEvent::new(ev)))
                            .collect();
                        // Everyone whose next revision the step covered (all of them when
                        // it reached `upto`), and at least the one it was read for.
                        let covered = members[i..]
                            .iter()
                            .take_while(|m| window_end > upto || m.next_rev < window_end)
                            .count()
                            .max(1);
                        for m in &members[i..i + covered] {
                            self.deliver_catch_up(m, &events, window_end, upto);
                        }
                        i += covered;
                    }
                }
            }
        }
        // Progress requests that were waiting for their stream to be synced.
        let mut st = self.lock();
        let ready: Vec<u64> = st
            .progress_waiting
            .iter()
            .copied()
            .filter(|id| st.stream_all_synced(*id))
            .collect();
        for id in ready {
            st.progress_waiting.remove(&id);
            let resp = st.progress_response(INVALID_WATCH_ID);
            if let Some(s) = st.streams.get(&id) {
                s.queue.push(resp);
            }
        }
    }

    /// Cancels a catching-up watcher whose next revision was compacted away.
    fn cancel_compacted(&self, m: &CatchUpMember, compact_revision: i64) {
        let mut st = self.lock();
        let Some(w) = st.watchers.get(&m.key) else {
            return;
        };
        if w.next_rev != m.next_rev {
            return;
        }
        let watch_id = w.watch_id;
        let Some(queue) = st.streams.get(&m.stream).map(|s| s.queue.clone()) else {
            return;
        };
        st.remove_watcher(m.key);
        // etcd quirk: compaction cancellations carry header revision 0.
        queue.push(WatchResponse {
            header: Some(rev_header(0)),
            watch_id,
            canceled: true,
            compact_revision,
            ..Default::default()
        });
    }

    /// Queues for one watcher its events of a catch-up step (`events`, read from history up to
    /// but not including `window_end`, at most `upto`), unless the watcher moved on or its
    /// stream has filled up since the step was read; then moves it on, and back to the synced
    /// watchers once it has caught up with the dispatched revision.
    fn deliver_catch_up(
        &self,
        m: &CatchUpMember,
        events: &[Arc<SharedEvent>],
        window_end: i64,
        upto: i64,
    ) {
        let mut st = self.lock();
        let Some(w) = st.watchers.get(&m.key) else {
            return;
        };
        if w.next_rev != m.next_rev {
            return;
        }
        let mine: EventList = events
            .iter()
            .filter(|e| w.wants(&e.event))
            .cloned()
            .collect();
        if !mine.is_empty() && !st.stream_has_room(m.stream, self.stream_queue_bytes) {
            return;
        }
        let Some(queue) = st.streams.get(&m.stream).map(|s| s.queue.clone()) else {
            return;
        };
        let done = window_end > upto;
        let header_rev = if done { upto } else { window_end - 1 };
        // Fragmenting keeps every event, so this is what the responses carry.
        let sent = mine.len() as u64;
        let (resps, bytes) = if mine.is_empty() {
            (Responses::new(), 0)
        } else {
            event_responses(
                w.watch_id,
                header_rev,
                mine,
                w.fragment,
                self.max_response_bytes,
            )
        };
        if !resps.is_empty() && !queue.try_push_catch_up(resps, bytes) {
            return;
        }
        self.catch_up_events.fetch_add(sent, Ordering::Relaxed);
        if let Some(w) = st.watchers.get_mut(&m.key) {
            w.next_rev = window_end.max(m.next_rev);
        }
        st.mark_synced_if_current(m.key);
    }

    /// Whether some watcher can make progress now (watchers waiting for a future start
    /// revision cannot, so they do not keep the syncer spinning).
    fn has_sync_work(&self) -> bool {
        let st = self.lock();
        let ready = st.dispatched_rev + 1;
        st.unsynced.iter().any(|k| {
            st.watchers.get(k).is_some_and(|w| {
                w.next_rev <= ready && st.stream_has_room(w.stream, self.stream_queue_bytes)
            })
        }) || !st.progress_waiting.is_empty()
    }

    fn progress_tick(&self) {
        let mut st = self.lock();
        let rev = st.dispatched_rev;
        let mut sends = Vec::new();
        for w in st.watchers.values_mut() {
            if w.progress_notify && w.synced {
                if !w.sent_since_tick {
                    sends.push((w.stream, w.watch_id));
                }
                w.sent_since_tick = false;
            }
        }
        for (stream, watch_id) in sends {
            if let Some(s) = st.streams.get(&stream) {
                s.queue.push(WatchResponse {
                    header: Some(rev_header(rev)),
                    watch_id,
                    ..Default::default()
                });
            }
        }
    }

    /// Watchers, streams and queued events, for metrics (one look under the hub's lock).
    pub fn counts(&self) -> HubCounts {
        let st = self.lock();
        let (mut pending_events, mut pending_bytes) = (0, 0);
        for s in st.streams.values() {
            let q = s.queue.lock();
            pending_bytes += q.event_bytes;
            pending_events += q
                .items
                .iter()
                .map(|out| match out {
                    Outgoing::Events { events, .. } => events.len(),
                    Outgoing::Response(r) => r.events.len(),
                })
                .sum::<usize>();
        }
        HubCounts {
            watchers: st.watchers.len(),
            unsynced: st.unsynced.len(),
            streams: st.streams.len(),
            pending_events,
            pending_bytes,
        }
    }
}

/// An in-process watch for the server-side recipes (locks and elections, which etcd runs over
/// its own Watch API): one watcher on a private stream of the hub, so it gets exactly what a
/// client's watcher would — history replay from `start_revision`, every event of a revision in
/// one response, and a cancellation (with `compact_revision`) when that revision is compacted.
/// Dropping it removes the watcher.
pub struct InternalWatch {
    hub: Arc<WatchHub>,
    stream: u64,
    queue: Arc<StreamQueue>,
}

impl WatchHub {
    /// Watches `[key, range_end)` (etcd's conventions: empty `range_end` is the single key) from
    /// `start_revision` (`<= 0`: from the next revision).
    pub fn watch_internal(
        self: &Arc<Self>,
        key: &[u8],
        range_end: &[u8],
        start_revision: i64,
    ) -> InternalWatch {
        let (stream, queue) = self.open_stream(Consumer::InProcess);
        self.create(
            stream,
            WatchCreateRequest {
                key: key.to_vec(),
                range_end: range_end.to_vec(),
                start_revision,
                ..Default::default()
            },
        );
        InternalWatch {
            hub: self.clone(),
            stream,
            queue,
        }
    }
}

impl InternalWatch {
    /// The next response with events, or a cancellation (`canceled` set); the `created`
    /// response is skipped. Header revisions are filled in, the other header fields are not.
    /// `None` once the watcher is gone.
    pub async fn next(&mut self) -> Option<WatchResponse> {
        self.next_queued().await.map(Outgoing::into_response)
    }

    /// [`InternalWatch::next`] as queued for a gRPC stream (see [`Outgoing::encode`]).
    pub async fn next_queued(&mut self) -> Option<Outgoing> {
        loop {
            let popped = self.queue.lock().pop_front();
            match popped {
                Some(Outgoing::Response(r)) if r.created && !r.canceled => continue,
                Some(out) => return Some(out),
                None if self.queue.is_closed() => return None,
                None => self.queue.notify.notified().await,
            }
        }
    }
}

impl Drop for InternalWatch {
    fn drop(&mut self) {
        self.hub.close_stream(self.stream);
    }
}

async fn syncer(hub: Weak<WatchHub>) {
    loop {
        let Some(h) = hub.upgrade() else { return };
        if h.has_sync_work() {
            let h2 = h.clone();
            // History reads touch the engine: keep them off the async workers.
            let _ = tokio::task::spawn_blocking(move || h2.sync_once()).await;
            if h.has_sync_work() {
                drop(h);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), h.sync_wanted.notified()).await;
        drop(h);
    }
}

async fn progress_ticker(hub: Weak<WatchHub>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(h) = hub.upgrade() else { return };
        h.progress_tick();
    }
}

/// Read access to the watched range, checked when the watch is created (etcd does not check
/// again later). An empty key means "\0", and range end "\0" every key from the key: unlike
/// etcd, which then checks only the first key, the whole watched range must be readable.
async fn watch_permitted(
    node: &KeelNode,
    caller: &crate::auth::Caller,
    c: &WatchCreateRequest,
) -> Result<(), &'static str> {
    if !node.mvcc.auth().enabled() {
        return Ok(());
    }
    let key: &[u8] = if c.key.is_empty() { &[0] } else { &c.key };
    match caller.check_read(node, key, &c.range_end).await {
        Ok(_) => Ok(()),
        // etcd sends the gRPC status text of its errors.
        Err(ServerError::InvalidAuthToken) => {
            Err("rpc error: code = Unauthenticated desc = etcdserver: invalid auth token")
        }
        Err(ServerError::AuthOldRevision) => Err(
            "rpc error: code = InvalidArgument desc = etcdserver: revision of auth store is old",
        ),
        Err(ServerError::UserEmpty) => {
            Err("rpc error: code = InvalidArgument desc = etcdserver: user name is empty")
        }
        Err(_) => Err("rpc error: code = PermissionDenied desc = etcdserver: permission denied"),
    }
}

pub struct WatchService {
    node: Arc<KeelNode>,
    hub: Arc<WatchHub>,
}

impl WatchService {
    pub fn new(node: Arc<KeelNode>, hub: Arc<WatchHub>) -> Self {
        Self { node, hub }
    }
}

/// A queued response and the member's header fields, encoded straight into the gRPC frame
/// (see [`crate::watch_wire`]).
pub struct WireResponse {
    pub out: Outgoing,
    pub header: ResponseHeader,
    /// Bytes the encoder should make room for before encoding this response: on the first
    /// response of a drained batch, the whole batch's (capped), so that the batch is encoded
    /// into one allocation instead of a buffer that doubles and copies itself as it fills;
    /// 0 on the others.
    pub reserve: usize,
}

/// At most this much is reserved at once for a drained batch ([`WireResponse::reserve`]).
const MAX_BATCH_RESERVE: usize = 4 << 20;
/// gRPC's length-prefixed message header.
const GRPC_MESSAGE_HEADER: usize = 5;

/// A watch call's responses.
pub type EncodedWatchStream = crate::node::ResponseStream<WireResponse>;

impl WatchService {
    /// `etcdserverpb.Watch/Watch` (served by [`crate::watch_wire::WatchServer`]).
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<EncodedWatchStream>, Status> {
        let require_leader = req
            .metadata()
            .get("hasleader")
            .and_then(|v| v.to_str().ok())
            == Some("true");
        if require_leader && self.node.leader().is_none() {
            return Err(ServerError::NoLeader.into());
        }
        let caller = crate::auth::Caller::of(&req);
        let mut incoming = req.into_inner();
        let (stream_id, queue) = self.hub.open_stream(Consumer::Grpc);

        // Client requests → hub.
        let hub = self.hub.clone();
        let recv_queue = queue.clone();
        let auth_node = self.node.clone();
        tokio::spawn(async move {
            while let Some(msg) = incoming.next().await {
                let Ok(msg) = msg else {
                    // The client's side broke: end the stream.
                    recv_queue.close();
                    hub.close_stream(stream_id);
                    return;
                };
                match msg.request_union {
                    Some(RequestUnion::CreateRequest(c)) => {
                        match watch_permitted(&auth_node, &caller, &c).await {
                            Ok(()) => hub.create(stream_id, c),
                            Err(reason) => hub.reject(stream_id, reason),
                        }
                    }
                    Some(RequestUnion::CancelRequest(c)) => hub.cancel(stream_id, c.watch_id),
                    Some(RequestUnion::ProgressRequest(_)) => hub.request_progress(stream_id),
                    None => {}
                }
            }
            // The client closed its sending side (half-close): as with etcd, its watchers keep
            // delivering until it cancels the call or goes away (the sender below notices).
        });

        // Hub → client: tonic polls the queue directly and encodes whatever it finds into one
        // write, so a revision seen by many watchers of this stream goes out as one chunk.
        let responses = QueueStream {
            hub: self.hub.clone(),
            node: self.node.clone(),
            stream_id,
            queue,
            ready: VecDeque::new(),
            header: ResponseHeader::default(),
            reserve: 0,
        };
        Ok(Response::new(self.node.until_stopping(Box::pin(responses))))
    }
}

/// A gRPC watch stream's responses, taken from its [`StreamQueue`] in bulk (and coalesced) and
/// handed to tonic's encoder one by one with the member's header fields. Dropping it (the
/// client cancelled the call or went away) closes the stream's watchers.
struct QueueStream {
    hub: Arc<WatchHub>,
    node: Arc<KeelNode>,
    stream_id: u64,
    queue: Arc<StreamQueue>,
    /// Taken from the queue, not yet handed to tonic.
    ready: VecDeque<Outgoing>,
    /// The member's header fields as of the last time the queue was drained.
    header: ResponseHeader,
    /// Room to reserve with the next response handed out (see [`WireResponse::reserve`]).
    reserve: usize,
}

impl QueueStream {
    /// Moves everything queued to `ready`; false if nothing was queued.
    fn refill(&mut self) -> bool {
        let batch = self.queue.lock().take_all();
        if batch.is_empty() {
            return false;
        }
        self.header = ResponseHeader {
            cluster_id: self.node.identity.cluster_id,
            member_id: self.node.member_id(),
            raft_term: self.node.term(),
            revision: 0,
        };
        self.ready = coalesce(batch, self.hub.max_response_bytes).into();
        self.reserve = self
            .ready
            .iter()
            .map(|o| GRPC_MESSAGE_HEADER + o.encoded_len_bound())
            .sum::<usize>()
            .min(MAX_BATCH_RESERVE);
        true
    }
}

impl Stream for QueueStream {
    type Item = Result<WireResponse, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if let Some(out) = this.ready.pop_front() {
                if let Outgoing::Events { events, .. } = &out {
                    EVENTS_SENT.fetch_add(events.len() as u64, Ordering::Relaxed);
                }
                return Poll::Ready(Some(Ok(WireResponse {
                    out,
                    header: this.header,
                    reserve: std::mem::take(&mut this.reserve),
                })));
            }
            if this.refill() {
                continue;
            }
            if this.queue.is_closed() {
                return Poll::Ready(None);
            }
            // Register, then look again: a push between the first look and the registration
            // would otherwise be missed.
            this.queue.waker.register(cx.waker());
            if this.refill() {
                continue;
            }
            if this.queue.is_closed() {
                return Poll::Ready(None);
            }
            return Poll::Pending;
        }
    }
}

impl Drop for QueueStream {
    fn drop(&mut self) {
        self.hub.close_stream(self.stream_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_store::engine::memory::MemoryEngine;

    /// Applies a put of `key` to `store`; returns the chunk as the state machine hands it to
    /// the hub.
    fn applied_put(store: &MvccStore, key: &[u8]) -> AppliedChunk {
        applied_put_of(store, key, b"v")
    }

    /// Applies one request to `store` and commits it; returns its events and the revision
    /// after it.
    fn apply_request(
        store: &MvccStore,
        request: keel_proto::keelpb::raft_request::Request,
    ) -> (Vec<Event>, i64) {
        let mut batch = store.begin_apply();
        let outcome = batch.apply(&keel_proto::keelpb::RaftRequest {
            request: Some(request),
            origin: None,
        });
        assert!(outcome.response.error.is_none());
        let revision = batch.revision();
        batch.commit(false).expect("commit");
        (outcome.events, revision)
    }

    /// [`applied_put`] of `value`.
    fn applied_put_of(store: &MvccStore, key: &[u8], value: &[u8]) -> AppliedChunk {
        use keel_proto::etcdserverpb::PutRequest;
        use keel_proto::keelpb::raft_request::Request;
        let (events, revision) = apply_request(
            store,
            Request::Put(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                ..Default::default()
            }),
        );
        AppliedChunk {
            applied: keel_store::raft::state_machine::AppliedState {
                index: revision as u64,
                revision,
            },
            events,
            ..Default::default()
        }
    }

    /// Revisions of the events `watch` receives until it has seen `last`.
    async fn revisions_until(watch: &mut InternalWatch, last: i64) -> Vec<i64> {
        let mut seen = Vec::new();
        while seen.last() != Some(&last) {
            let resp = tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .unwrap_or_else(|_| panic!("no answer in time; seen so far: {seen:?}"))
                .expect("the watch is open");
            assert!(!resp.canceled, "{resp:?}");
            seen.extend(
                resp.events
                    .iter()
                    .filter_map(|e| e.kv.as_ref())
                    .map(|kv| kv.mod_revision),
            );
        }
        seen
    }

    /// Revisions applied but never dispatched (a member installing a snapshot) are replayed
    /// from history to every synced watcher: from the revision after the last one dispatched,
    /// also for a watcher that received nothing for a while, with nothing twice.
    #[tokio::test]
    async fn revisions_skipped_by_a_snapshot_are_replayed_exactly_once() {
        let engine = Arc::new(keel_store::engine::memory::MemoryEngine::new());
        let store = Arc::new(MvccStore::open(engine).expect("open"));
        let hub = WatchHub::new(1 << 20, Duration::from_secs(600));
        hub.attach(store.clone());
        let mut on_a = hub.watch_internal(b"a", b"", 0);
        let mut from_a = hub.watch_internal(b"a", b"\0", 0);
        let first = store.current_revision() + 1;
        let rev = |n: i64| first + n - 1; // the n-th put's revision
        hub.on_applied(&applied_put(&store, b"a")); // put 1
        for _ in 0..4 {
            hub.on_applied(&applied_put(&store, b"b")); // puts 2..=5
        }
        for key in [b"a", b"b", b"a"] {
            applied_put(&store, key); // puts 6..=8, never dispatched
        }
        hub.on_applied(&applied_put(&store, b"a")); // put 9 reveals the gap
        assert_eq!(
            revisions_until(&mut on_a, rev(9)).await,
            [1, 6, 8, 9].map(rev)
        );
        assert_eq!(
            revisions_until(&mut from_a, rev(9)).await,
            (1..=9).map(rev).collect::<Vec<_>>()
        );
        // Both are live again, and a dispatched revision is never offered twice.
        let chunk = applied_put(&store, b"a"); // put 10
        hub.on_applied(&chunk);
        hub.on_applied(&chunk);
        hub.on_applied(&applied_put(&store, b"a")); // put 11
        assert_eq!(revisions_until(&mut on_a, rev(11)).await, [10, 11].map(rev));
        assert_eq!(
            revisions_until(&mut from_a, rev(11)).await,
            [10, 11].map(rev)
        );
    }

    /// Compacts `store` at `revision` (logically; what a history read checks).
    fn apply_compaction(store: &MvccStore, revision: i64) {
        use keel_proto::etcdserverpb::CompactionRequest;
        use keel_proto::keelpb::raft_request::Request;
        apply_request(
            store,
            Request::Compaction(CompactionRequest {
                revision,
                physical: false,
            }),
        );
    }

    /// Watchers of one range that need history are caught up together: a step read for the
    /// one furthest behind serves every watcher whose next revision it covers, a watcher
    /// further ahead gets a read of its own in the same pass (it does not wait for the others),
    /// and each receives exactly the revisions from its own start on, once and in order.
    #[tokio::test]
    async fn watchers_of_one_range_share_their_catch_up_reads() {
        // 9 000 events in the range: three steps of CATCH_UP_EVENTS (4 096) from the start.
        const PUTS: i64 = 10_000;
        let store = Arc::new(MvccStore::open(Arc::new(MemoryEngine::new())).expect("open"));
        let first = store.current_revision() + 1;
        for i in 0..PUTS {
            let key = if i % 10 == 0 {
                "q/x".to_string()
            } else {
                format!("p/{}", i % 7)
            };
            applied_put(&store, key.as_bytes());
        }
        let last = store.current_revision();
        let in_range = |from: i64| -> Vec<i64> {
            (from..=last)
                .filter(|rev| (rev - first) % 10 != 0)
                .collect()
        };
        let hub = WatchHub::new(1 << 20, Duration::from_secs(600));
        hub.attach(store.clone());
        // All created before this test yields, so the syncer's first pass sees all of them.
        let mut behind: Vec<InternalWatch> = (0..20)
            .map(|_| hub.watch_internal(b"p/", b"p0", first))
            .collect();
        let mut a_little_behind = hub.watch_internal(b"p/", b"p0", first + 3);
        let mut ahead = hub.watch_internal(b"p/", b"p0", last - 50);
        let mut other_range = hub.watch_internal(b"q/", b"q0", first);
        let last_p = *in_range(first).last().expect("events");
        for w in &mut behind {
            assert_eq!(revisions_until(w, last_p).await, in_range(first));
        }
        assert_eq!(
            revisions_until(&mut a_little_behind, last_p).await,
            in_range(first + 3)
        );
        assert_eq!(
            revisions_until(&mut ahead, last_p).await,
            in_range(last - 50)
        );
        let q: Vec<i64> = (first..=last)
            .filter(|rev| (rev - first) % 10 == 0)
            .collect();
        assert_eq!(
            revisions_until(&mut other_range, *q.last().expect("q")).await,
            q
        );
        // "p/": three steps for the 21 watchers behind, one read for the one ahead (in the
        // first pass). "q/", a group of its own: one read (1 000 events). One read per
        // watcher and step would have been 21 * 3 + 1 + 1.
        assert_eq!(hub.catch_up_reads.load(Ordering::Relaxed), 3 + 1 + 1);
        assert_eq!(
            hub.catch_up_events.load(Ordering::Relaxed) as usize,
            20 * in_range(first).len()
                + in_range(first + 3).len()
                + in_range(last - 50).len()
                + q.len()
        );
    }

    /// A step read for a group fails when its lowest revision was compacted: the watchers
    /// that need a compacted revision are canceled with the compaction revision, and the
    /// others of the group still catch up.
    #[tokio::test]
    async fn a_compacted_catch_up_cancels_only_the_watchers_that_need_it() {
        let store = Arc::new(MvccStore::open(Arc::new(MemoryEngine::new())).expect("open"));
        let first = store.current_revision() + 1;
        for _ in 0..20 {
            applied_put(&store, b"p/a");
        }
        let last = store.current_revision();
        let hub = WatchHub::new(1 << 20, Duration::from_secs(600));
        hub.attach(store.clone());
        let mut old = hub.watch_internal(b"p/", b"p0", first);
        let mut recent = hub.watch_internal(b"p/", b"p0", first + 10);
        // Compacted after both were created and before the syncer ran (no yield since).
        apply_compaction(&store, first + 5);
        let canceled = tokio::time::timeout(Duration::from_secs(5), old.next())
            .await
            .expect("in time")
            .expect("a response");
        assert!(
            canceled.canceled && canceled.events.is_empty(),
            "{canceled:?}"
        );
        assert_eq!(canceled.compact_revision, first + 5);
        assert_eq!(
            revisions_until(&mut recent, last).await,
            (first + 10..=last).collect::<Vec<_>>()
        );
    }

    /// A stream that does not read holds at most its byte limit (plus one revision's response)
    /// however large the events, both while it is fed live and while its watchers catch up
    /// from history; they still receive every event, once each and in order, when it reads
    /// again. Four watchers share the stream, so catch-up steps for one must leave room checks
    /// to the next.
    #[tokio::test]
    async fn a_slow_streams_queue_is_bounded_in_bytes_and_loses_nothing() {
        const LIMIT: usize = 64 << 10;
        const VALUE: usize = 4 << 10;
        const PUTS: i64 = 100;
        const WATCHERS: usize = 4;
        let engine = Arc::new(keel_store::engine::memory::MemoryEngine::new());
        let store = Arc::new(MvccStore::open(engine).expect("open"));
        let hub = WatchHub::with_stream_queue_bytes(1 << 20, Duration::from_secs(600), LIMIT);
        hub.attach(store.clone());
        let (stream, queue) = hub.open_stream(Consumer::InProcess);
        for _ in 0..WATCHERS {
            hub.create(
                stream,
                WatchCreateRequest {
                    key: b"big/".to_vec(),
                    range_end: b"big0".to_vec(),
                    ..Default::default()
                },
            );
        }
        let mut slow = InternalWatch {
            hub: hub.clone(),
            stream,
            queue,
        };
        let first = store.current_revision() + 1;
        let value = vec![b'x'; VALUE];
        // One response of one event: what may come on top of the limit.
        let one_response = RESPONSE_OVERHEAD + VALUE + 64;
        for i in 0..PUTS {
            hub.on_applied(&applied_put_of(
                &store,
                format!("big/{i}").as_bytes(),
                &value,
            ));
            let pending = hub.counts().pending_bytes;
            assert!(pending <= LIMIT, "{pending} bytes queued after put {i}");
        }
        // 400 events of 4 KiB do not fit in 64 KiB: the watchers became victims.
        assert_eq!(hub.victims.load(Ordering::Relaxed), WATCHERS as u64);
        let queued = hub.counts().pending_events;
        assert!(queued < 16, "{queued} events queued");
        // Reading lets the syncer catch them up from history, in steps that keep to the limit.
        let last = first + PUTS - 1;
        let mut seen: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        while seen.len() < WATCHERS || seen.values().any(|revs| revs.last() != Some(&last)) {
            let resp = tokio::time::timeout(Duration::from_secs(5), slow.next())
                .await
                .unwrap_or_else(|_| panic!("no answer in time; seen so far: {seen:?}"))
                .expect("the watch is open");
            assert!(!resp.canceled, "{resp:?}");
            let revs = seen.entry(resp.watch_id).or_default();
            revs.extend(resp.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| {
                assert_eq!(kv.value.len(), VALUE);
                kv.mod_revision
            }));
            let pending = hub.counts().pending_bytes;
            assert!(pending <= LIMIT + one_response, "{pending} bytes queued");
        }
        for revs in seen.values() {
            assert_eq!(*revs, (first..=last).collect::<Vec<_>>());
        }
        let replayed = hub.catch_up_events.load(Ordering::Relaxed);
        assert!(
            replayed >= (WATCHERS * PUTS as usize - queued) as u64,
            "{replayed}"
        );
    }

    fn put_event(key: &[u8], rev: i64, value_len: usize) -> Arc<SharedEvent> {
        Arc::new(SharedEvent::new(Event {
            r#type: 0,
            kv: Some(keel_proto::mvccpb::KeyValue {
                key: key.to_vec(),
                value: vec![0; value_len],
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: None,
        }))
    }

    fn events_of(watch_id: i64, rev: i64, fragment: bool, value_len: usize) -> Outgoing {
        Outgoing::Events {
            watch_id,
            header_rev: rev,
            fragment,
            events: smallvec::smallvec![put_event(b"k", rev, value_len)],
        }
    }

    /// (watch ID, header revision, fragment, revisions of the events) of a response.
    type Shape = (i64, i64, bool, Vec<i64>);

    /// The [`Shape`] of each response, or `None` for a control response.
    fn shape_of(out: &[Outgoing]) -> Vec<Option<Shape>> {
        out.iter()
            .map(|o| match o {
                Outgoing::Response(_) => None,
                Outgoing::Events {
                    watch_id,
                    header_rev,
                    fragment,
                    events,
                } => Some((
                    *watch_id,
                    *header_rev,
                    *fragment,
                    events
                        .iter()
                        .map(|e| e.event.kv.as_ref().map_or(0, |kv| kv.mod_revision))
                        .collect(),
                )),
            })
            .collect()
    }

    #[test]
    fn coalescing_merges_a_watchers_revisions_but_not_across_control_responses() {
        let progress = Outgoing::Response(Box::new(WatchResponse {
            header: Some(rev_header(12)),
            watch_id: INVALID_WATCH_ID,
            ..Default::default()
        }));
        let batch = vec![
            events_of(1, 10, false, 10),
            events_of(2, 10, false, 10),
            events_of(1, 11, false, 10),
            events_of(2, 11, false, 10),
            events_of(1, 12, false, 10),
            progress,
            events_of(1, 13, false, 10),
            events_of(2, 13, false, 10),
            events_of(1, 14, false, 10),
        ];
        assert_eq!(
            shape_of(&coalesce(batch, 1 << 20)),
            vec![
                Some((1, 12, false, vec![10, 11, 12])),
                Some((2, 11, false, vec![10, 11])),
                None,
                Some((1, 14, false, vec![13, 14])),
                Some((2, 13, false, vec![13])),
            ]
        );
    }

    #[test]
    fn coalescing_respects_the_size_limit_and_fragments() {
        // Each event is about 100 bytes: two fit in 300 with the overhead, three do not.
        let batch: Vec<Outgoing> = (1..=5).map(|r| events_of(7, r, false, 80)).collect();
        assert_eq!(
            shape_of(&coalesce(batch, 300)),
            vec![
                Some((7, 2, false, vec![1, 2])),
                Some((7, 4, false, vec![3, 4])),
                Some((7, 5, false, vec![5])),
            ]
        );
        // A fragmented revision 2 (two parts) stays as it was; revision 3 starts a new response.
        let batch = vec![
            events_of(7, 1, false, 10),
            events_of(7, 2, true, 10),
            events_of(7, 2, false, 10),
            events_of(7, 3, false, 10),
            events_of(7, 4, false, 10),
        ];
        assert_eq!(
            shape_of(&coalesce(batch, 1 << 20)),
            vec![
                Some((7, 1, false, vec![1])),
                Some((7, 2, true, vec![2])),
                Some((7, 2, false, vec![2])),
                Some((7, 4, false, vec![3, 4])),
            ]
        );
    }

    #[test]
    fn fragmentation_splits_but_keeps_every_event() {
        let events: Vec<Event> = (0..10)
            .map(|i| Event {
                r#type: 0,
                kv: Some(keel_proto::mvccpb::KeyValue {
                    key: vec![b'k', i],
                    value: vec![0; 100],
                    mod_revision: 5,
                    ..Default::default()
                }),
                prev_kv: None,
            })
            .collect();
        let shared: EventList = events
            .iter()
            .cloned()
            .map(|e| Arc::new(SharedEvent::new(e)))
            .collect();
        let (whole, _) = event_responses(1, 5, shared.clone(), false, 300);
        assert_eq!(whole.len(), 1);
        let (parts, bytes) = event_responses(1, 5, shared, true, 300);
        // What the stream's queue counts is what the parts count.
        assert_eq!(
            bytes,
            parts.iter().map(Outgoing::queued_bytes).sum::<usize>()
        );
        let parts: Vec<WatchResponse> = parts.into_iter().map(Outgoing::into_response).collect();
        assert!(parts.len() > 1);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts.last().unwrap().fragment);
        assert!(parts.iter().all(|p| p.encoded_len() <= 300));
        let rejoined: Vec<Event> = parts.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(rejoined, events);
    }
}
