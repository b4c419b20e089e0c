//! Watches: the bounded history of changes they replay from a resourceVersion, the open watches
//! each change is sent to (filtered as the watch cache filters), and the streamed response body
//! of newline-delimited events with periodic bookmarks.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, Sleep};

use crate::resources::Kind;
use crate::selector::Selector;
use crate::status::{self, Status};
use crate::store::Store;

/// Changes kept for watches that resume from a resourceVersion; older ones get 410.
const HISTORY: usize = 10_000;

/// How often a watch that allows bookmarks gets one.
pub const BOOKMARK_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One committed change.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: &'static Kind,
    pub event: EventType,
    pub object: Arc<Value>,
    /// The object before a modification.
    pub old: Option<Arc<Value>>,
    pub revision: u64,
}

/// What a watch stream sends next.
#[derive(Debug, Clone)]
pub enum Message {
    Event(&'static str, Arc<Value>),
    Bookmark {
        kind: &'static Kind,
        revision: u64,
        /// Ends the initial events of a streaming list (`sendInitialEvents=true`).
        initial_end: bool,
    },
    /// The `ERROR` event that ends the stream (410 Expired).
    Error(Status),
}

/// What a watch asked for.
#[derive(Debug, Clone)]
pub struct Filter {
    pub kind: &'static Kind,
    pub namespace: Option<String>,
    pub selector: Selector,
    pub bookmarks: bool,
}

impl Filter {
    /// The event this watch sees for `change`: a change into or out of its selector is an
    /// ADDED or a DELETED, as the watch cache sends them.
    pub fn event_for(&self, change: &Change) -> Option<Message> {
        let object = &change.object;
        if change.kind.group != self.kind.group
            || change.kind.plural != self.kind.plural
            || self
                .namespace
                .as_deref()
                .is_some_and(|ns| object["metadata"]["namespace"] != ns)
        {
            return None;
        }
        let now = self.selector.matches(object);
        let before = change.old.as_deref().is_some_and(|old| self.selector.matches(old));
        let event = match (change.event, before, now) {
            (EventType::Added, _, true) => "ADDED",
            (EventType::Deleted, _, true) => "DELETED",
            (EventType::Modified, true, true) => "MODIFIED",
            (EventType::Modified, false, true) => "ADDED",
            (EventType::Modified, true, false) => {
                let mut gone = change.old.as_deref().cloned().unwrap_or_default();
                gone["metadata"]["resourceVersion"] = json!(change.revision.to_string());
                return Some(Message::Event("DELETED", Arc::new(gone)));
            }
            _ => return None,
        };
        Some(Message::Event(event, object.clone()))
    }
}

#[derive(Debug)]
struct Open {
    filter: Filter,
    /// The last resourceVersion this watch was sent.
    last: u64,
    sender: mpsc::UnboundedSender<Message>,
}

/// The history and the open watches.
#[derive(Debug, Default)]
pub struct Watches {
    history: VecDeque<Change>,
    /// The history holds every change after this resourceVersion.
    oldest: u64,
    open: HashMap<u64, Open>,
    next_id: u64,
}

/// A watch just opened: what to send first, then what arrives.
#[derive(Debug)]
pub struct Subscription {
    pub id: u64,
    pub initial: Vec<Message>,
    pub events: mpsc::UnboundedReceiver<Message>,
}

impl Watches {
    pub fn publish(&mut self, change: Change) {
        self.open.retain(|_, open| match open.filter.event_for(&change) {
            Some(message) => {
                open.last = change.revision;
                open.sender.send(message).is_ok()
            }
            None => true,
        });
        self.history.push_back(change);
        if self.history.len() > HISTORY
            && let Some(dropped) = self.history.pop_front()
        {
            self.oldest = dropped.revision;
        }
    }

    /// Opens a watch from `from` (changes after it), or from `now` after `initial`.
    pub fn open(&mut self, filter: Filter, from: Option<u64>, now: u64, mut initial: Vec<Message>) -> Subscription {
        let (sender, events) = mpsc::unbounded_channel();
        self.next_id += 1;
        let id = self.next_id;
        if let Some(from) = from {
            if from < self.oldest {
                let expired = Message::Error(status::expired(from, self.oldest));
                return Subscription {
                    id,
                    initial: vec![expired],
                    events,
                };
            }
            let replay = self.history.iter().filter(|c| c.revision > from);
            initial.extend(replay.filter_map(|change| filter.event_for(change)));
        }
        let open = Open {
            filter,
            last: from.unwrap_or(now),
            sender,
        };
        self.open.insert(id, open);
        Subscription { id, initial, events }
    }

    pub fn close(&mut self, id: u64) {
        self.open.remove(&id);
    }

    /// Sends a bookmark at `revision` to the watch `id`, when it allows them.
    pub fn bookmark(&mut self, id: u64, revision: u64) {
        if let Some(open) = self.open.get(&id).filter(|o| o.filter.bookmarks) {
            let kind = open.filter.kind;
            _ = open.sender.send(Message::Bookmark {
                kind,
                revision,
                initial_end: false,
            });
        }
    }

    /// Bookmarks every watch that allows them.
    pub fn bookmark_all(&mut self, revision: u64) {
        let ids: Vec<u64> = self.open.keys().copied().collect();
        for id in ids {
            self.bookmark(id, revision);
        }
    }

    /// Forgets the history; every open watch gets 410 and ends.
    pub fn compact(&mut self, revision: u64) {
        self.history.clear();
        self.oldest = revision;
        for (_, open) in self.open.drain() {
            _ = open.sender.send(Message::Error(status::expired(open.last, revision)));
        }
    }

    /// Ends the watches on `kind` (its CRD went away).
    pub fn end_kind(&mut self, kind: &Kind) {
        self.open
            .retain(|_, open| open.filter.kind.group != kind.group || open.filter.kind.plural != kind.plural);
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }
}

/// An object as `PartialObjectMetadata`, for clients that ask for metadata only.
pub fn partial_metadata(object: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]})
}

fn encode(message: &Message, metadata_only: bool) -> Bytes {
    let event = match message {
        Message::Event(event, object) if metadata_only => json!({"type": event, "object": partial_metadata(object)}),
        Message::Event(event, object) => json!({"type": event, "object": **object}),
        Message::Bookmark {
            kind,
            revision,
            initial_end,
        } => {
            let mut metadata = json!({"resourceVersion": revision.to_string()});
            if *initial_end {
                metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            let object = json!({"kind": kind.kind, "apiVersion": kind.api_version(), "metadata": metadata});
            json!({"type": "BOOKMARK", "object": object})
        }
        Message::Error(status) => json!({"type": "ERROR", "object": status.body}),
    };
    let mut line = serde_json::to_vec(&event).expect("JSON values serialize");
    line.push(b'\n');
    Bytes::from(line)
}

/// The streamed body of a watch response; closing it (or the connection) closes the watch.
#[derive(Debug)]
pub struct WatchBody {
    store: Arc<Store>,
    id: u64,
    pending: VecDeque<Message>,
    events: mpsc::UnboundedReceiver<Message>,
    bookmarks: Option<Interval>,
    deadline: Pin<Box<Sleep>>,
    metadata_only: bool,
    ended: bool,
}

impl WatchBody {
    pub fn new(store: Arc<Store>, subscription: Subscription, timeout: Duration, metadata_only: bool) -> WatchBody {
        let bookmarks = {
            let state = store.lock();
            let allowed = state
                .watches
                .open
                .get(&subscription.id)
                .is_some_and(|o| o.filter.bookmarks);
            allowed.then(|| tokio::time::interval_at(Instant::now() + BOOKMARK_PERIOD, BOOKMARK_PERIOD))
        };
        WatchBody {
            store,
            id: subscription.id,
            pending: subscription.initial.into(),
            events: subscription.events,
            bookmarks,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            metadata_only,
            ended: false,
        }
    }
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(message) = this.pending.pop_front() {
                this.ended |= matches!(message, Message::Error(_));
                return Poll::Ready(Some(Ok(Frame::data(encode(&message, this.metadata_only)))));
            }
            if this.ended || this.deadline.as_mut().poll(cx).is_ready() {
                this.ended = true;
                return Poll::Ready(None);
            }
            match this.events.poll_recv(cx) {
                Poll::Ready(Some(message)) => {
                    this.pending.push_back(message);
                    continue;
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => {}
            }
            if let Some(bookmarks) = &mut this.bookmarks
                && bookmarks.poll_tick(cx).is_ready()
            {
                let mut state = this.store.lock();
                let revision = state.revision();
                state.watches.bookmark(this.id, revision);
                continue;
            }
            return Poll::Pending;
        }
    }
}

impl Drop for WatchBody {
    fn drop(&mut self) {
        self.store.lock().watches.close(self.id);
    }
}
