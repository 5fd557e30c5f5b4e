//! The durable event queue: one redb database at `<data-dir>/events/queue.redb`.
//!
//! ```text
//! table "events"          u64 id          -> JSON EventRecord (pending async invocations)
//! table "queue_messages"  (queue, u64 seq) -> JSON QueueMessage (local SQS-style queues)
//! ```
//! Every change is one write transaction committed with redb's default (immediate, fsync'ed)
//! durability, so an accepted event survives a crash. An event leaves the table only in the
//! transaction that records its final outcome (and, in the same transaction, whatever that
//! outcome produces: a destination event or a queue message): delivery is at-least-once.
//!
//! Beside the table, an in-memory index says when each event is due and which ones a worker
//! holds; it is rebuilt from the table at open, which makes every event due again after a
//! restart (held ones included: their outcome was never recorded).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue_messages");

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("event queue database: {0}")]
    Db(#[from] redb::Error),
    #[error("event queue record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("event queue directory: {0}")]
    Io(#[from] std::io::Error),
}

/// Any of redb's per-operation error types, as the one [`QueueError::Db`].
fn dberr<E: Into<redb::Error>>(e: E) -> QueueError {
    QueueError::Db(e.into())
}

/// What a function's last attempt answered, kept for the destination record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LastResponse {
    /// `Unhandled` for a function error; `None` for a success.
    pub function_error: Option<String>,
    /// The response or error document (UTF-8, lossily).
    pub body: String,
}

/// One pending asynchronous invocation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventRecord {
    /// The request id returned to the caller; every attempt runs under it, as in Lambda.
    pub request_id: String,
    /// The function's name.
    pub function: String,
    /// The event: JSON text (validated at enqueue).
    pub payload: String,
    #[serde(default)]
    pub client_context: Option<String>,
    /// When it was accepted (ms since the Unix epoch): the base of its age.
    pub enqueued_at_ms: u64,
    /// Not to be run before this (ms since the Unix epoch).
    pub due_at_ms: u64,
    /// Attempts that reached the function (the record's `approximateInvokeCount`).
    #[serde(default)]
    pub attempts: u32,
    /// Throttles and service errors in a row (their backoff exponent).
    #[serde(default)]
    pub throttles: u32,
    #[serde(default)]
    pub last_response: Option<LastResponse>,
}

impl EventRecord {
    pub fn new(
        request_id: String,
        function: String,
        payload: String,
        client_context: Option<String>,
    ) -> Self {
        let now = now_ms();
        EventRecord {
            request_id,
            function,
            payload,
            client_context,
            enqueued_at_ms: now,
            due_at_ms: now,
            attempts: 0,
            throttles: 0,
            last_response: None,
        }
    }
}

/// A message in a local queue (an `arn:aws:sqs:...` destination), in SQS's field names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct QueueMessage {
    pub message_id: String,
    /// ms since the Unix epoch.
    pub sent_timestamp: u64,
    pub body: String,
}

/// A local queue and how many messages it holds.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct QueueSummary {
    pub name: String,
    pub messages: u64,
}

/// What finishing an event leaves behind, written in the same transaction as its removal.
#[derive(Debug, Clone)]
pub enum Followup {
    /// A new asynchronous invocation (a function destination).
    Event(EventRecord),
    /// A message for a local queue.
    Message { queue: String, body: String },
}

/// Queue depth and age, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Events not yet finished (waiting, scheduled for a retry, or running).
    pub depth: u64,
    /// Of those, the ones a worker is running now.
    pub in_flight: u64,
    /// Age of the oldest unfinished event.
    pub oldest_age: Option<Duration>,
    /// Messages in all local queues.
    pub queued_messages: u64,
}

/// What [`EventQueue::take_due`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// This event is now held by the caller.
    Ready(u64),
    /// Nothing due; the next event is due in this long.
    Wait(Duration),
    /// No waiting events at all.
    Empty,
}

#[derive(Default)]
struct Index {
    /// Waiting events by due time: (due ms, id).
    due: BTreeSet<(u64, u64)>,
    /// Every unfinished event: id -> (enqueued ms, due ms or None while held).
    events: HashMap<u64, (u64, Option<u64>)>,
    /// Unfinished events by age: (enqueued ms, id).
    by_age: BTreeSet<(u64, u64)>,
    /// Messages per local queue.
    messages: BTreeMap<String, u64>,
}

impl Index {
    fn add(&mut self, id: u64, enqueued: u64, due: u64) {
        self.events.insert(id, (enqueued, Some(due)));
        self.by_age.insert((enqueued, id));
        self.due.insert((due, id));
    }

    fn remove(&mut self, id: u64) {
        if let Some((enqueued, due)) = self.events.remove(&id) {
            self.by_age.remove(&(enqueued, id));
            if let Some(d) = due {
                self.due.remove(&(d, id));
            }
        }
    }
}

pub struct EventQueue {
    db: Database,
    index: Mutex<Index>,
    next_id: AtomicU64,
    /// Wakes the dispatcher when an event is added or becomes due sooner.
    notify: Notify,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EventQueue {
    /// Opens (creating if needed) the queue at `path`. Blocking: redb recovers a database
    /// that was not closed cleanly here.
    pub fn open(path: &Path) -> Result<EventQueue, QueueError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let db = Database::create(path).map_err(dberr)?;
        // Create the tables, so that readers never meet a missing one.
        let tx = db.begin_write().map_err(dberr)?;
        tx.open_table(EVENTS).map_err(dberr)?;
        tx.open_table(MESSAGES).map_err(dberr)?;
        tx.commit().map_err(dberr)?;

        let mut index = Index::default();
        let mut last_id = 0;
        let tx = db.begin_read().map_err(dberr)?;
        let events = tx.open_table(EVENTS).map_err(dberr)?;
        for row in events.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let id = k.value();
            last_id = last_id.max(id);
            match serde_json::from_slice::<EventRecord>(v.value()) {
                // Due as recorded: a retry keeps its backoff across a restart; an event that
                // was running when the agent stopped is due (its due time has passed).
                Ok(r) => index.add(id, r.enqueued_at_ms, r.due_at_ms),
                Err(e) => tracing::error!(id, error = %e, "skipping an unreadable queued event"),
            }
        }
        let messages = tx.open_table(MESSAGES).map_err(dberr)?;
        for row in messages.iter().map_err(dberr)? {
            let (k, _) = row.map_err(dberr)?;
            let (queue, _) = k.value();
            *index.messages.entry(queue.to_string()).or_default() += 1;
        }
        drop((events, messages, tx));
        if !index.events.is_empty() {
            tracing::info!(
                events = index.events.len(),
                "asynchronous events left from a previous run will be delivered again"
            );
        }
        Ok(EventQueue {
            db,
            index: Mutex::new(index),
            next_id: AtomicU64::new(last_id + 1),
            notify: Notify::new(),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an event durably: when this returns `Ok`, it is on disk. Blocking.
    pub fn enqueue(&self, record: &EventRecord) -> Result<u64, QueueError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = serde_json::to_vec(record)?;
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut t = tx.open_table(EVENTS).map_err(dberr)?;
            t.insert(id, bytes.as_slice()).map_err(dberr)?;
        }
        tx.commit().map_err(dberr)?;
        self.index()
            .add(id, record.enqueued_at_ms, record.due_at_ms);
        self.notify.notify_one();
        Ok(id)
    }

    /// Takes the earliest due event, if one is due at `now_ms`; the caller holds it until it
    /// calls [`finish`](Self::finish), [`reschedule`](Self::reschedule) or
    /// [`release`](Self::release).
    pub fn take_due(&self, now_ms: u64) -> Take {
        let mut index = self.index();
        let Some(&(due, id)) = index.due.first() else {
            return Take::Empty;
        };
        if due > now_ms {
            return Take::Wait(Duration::from_millis(due - now_ms));
        }
        index.due.remove(&(due, id));
        if let Some(e) = index.events.get_mut(&id) {
            e.1 = None;
        }
        Take::Ready(id)
    }

    /// Resolves when an event may have been added or made due sooner.
    pub async fn changed(&self) {
        self.notify.notified().await
    }

    /// Reads an event. Blocking.
    pub fn get(&self, id: u64) -> Result<Option<EventRecord>, QueueError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(EVENTS).map_err(dberr)?;
        let Some(v) = t.get(id).map_err(dberr)? else {
            return Ok(None);
        };
        Ok(Some(serde_json::from_slice(v.value())?))
    }

    /// Stores a held event's new state (attempts, due time) and lets it wait again. Blocking.
    pub fn reschedule(&self, id: u64, record: &EventRecord) -> Result<(), QueueError> {
        let bytes = serde_json::to_vec(record)?;
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut t = tx.open_table(EVENTS).map_err(dberr)?;
            t.insert(id, bytes.as_slice()).map_err(dberr)?;
        }
        tx.commit().map_err(dberr)?;
        let mut index = self.index();
        index.remove(id);
        index.add(id, record.enqueued_at_ms, record.due_at_ms);
        drop(index);
        self.notify.notify_one();
        Ok(())
    }

    /// Lets a held event wait again, unchanged on disk, due after `delay` (the worker could not
    /// process it, e.g. the database failed).
    pub fn release(&self, id: u64, delay: Duration) {
        let mut index = self.index();
        if let Some(&(enqueued, _)) = index.events.get(&id) {
            index.remove(id);
            index.add(id, enqueued, now_ms() + delay.as_millis() as u64);
        }
        drop(index);
        self.notify.notify_one();
    }

    /// Removes a held event and writes what its outcome leaves behind, in one transaction.
    /// Blocking.
    pub fn finish(&self, id: u64, followups: &[Followup]) -> Result<(), QueueError> {
        let mut new_events = Vec::new();
        let mut new_messages: Vec<&str> = Vec::new();
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut events = tx.open_table(EVENTS).map_err(dberr)?;
            let mut messages = tx.open_table(MESSAGES).map_err(dberr)?;
            events.remove(id).map_err(dberr)?;
            for f in followups {
                match f {
                    Followup::Event(r) => {
                        let new_id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        events
                            .insert(new_id, serde_json::to_vec(r)?.as_slice())
                            .map_err(dberr)?;
                        new_events.push((new_id, r.enqueued_at_ms, r.due_at_ms));
                    }
                    Followup::Message { queue, body } => {
                        let seq = match messages
                            .range((queue.as_str(), 0)..=(queue.as_str(), u64::MAX))
                            .map_err(dberr)?
                            .next_back()
                        {
                            Some(row) => row.map_err(dberr)?.0.value().1 + 1,
                            None => 0,
                        };
                        let msg = QueueMessage {
                            message_id: uuid::Uuid::new_v4().to_string(),
                            sent_timestamp: now_ms(),
                            body: body.clone(),
                        };
                        messages
                            .insert((queue.as_str(), seq), serde_json::to_vec(&msg)?.as_slice())
                            .map_err(dberr)?;
                        new_messages.push(queue);
                    }
                }
            }
        }
        tx.commit().map_err(dberr)?;
        let mut index = self.index();
        index.remove(id);
        for (new_id, enqueued, due) in &new_events {
            index.add(*new_id, *enqueued, *due);
        }
        for q in new_messages {
            *index.messages.entry(q.to_string()).or_default() += 1;
        }
        drop(index);
        if !new_events.is_empty() {
            self.notify.notify_one();
        }
        Ok(())
    }

    /// Depth and age of the queue (cheap: from the in-memory index).
    pub fn stats(&self) -> QueueStats {
        let index = self.index();
        let now = now_ms();
        QueueStats {
            depth: index.events.len() as u64,
            in_flight: index.events.values().filter(|e| e.1.is_none()).count() as u64,
            oldest_age: index
                .by_age
                .first()
                .map(|&(enqueued, _)| Duration::from_millis(now.saturating_sub(enqueued))),
            queued_messages: index.messages.values().sum(),
        }
    }

    /// The local queues that hold messages.
    pub fn queues(&self) -> Vec<QueueSummary> {
        self.index()
            .messages
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(name, n)| QueueSummary {
                name: name.clone(),
                messages: *n,
            })
            .collect()
    }

    /// The messages of a local queue, oldest first (they stay in the queue). Blocking.
    pub fn messages(&self, queue: &str) -> Result<Vec<QueueMessage>, QueueError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(MESSAGES).map_err(dberr)?;
        let mut out = Vec::new();
        for row in t.range((queue, 0)..=(queue, u64::MAX)).map_err(dberr)? {
            let (_, v) = row.map_err(dberr)?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    /// Deletes every message of a local queue; returns how many. Blocking.
    pub fn purge(&self, queue: &str) -> Result<u64, QueueError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        let mut n = 0;
        {
            let mut t = tx.open_table(MESSAGES).map_err(dberr)?;
            t.retain_in((queue, 0)..=(queue, u64::MAX), |_, _| {
                n += 1;
                false
            })
            .map_err(dberr)?;
        }
        tx.commit().map_err(dberr)?;
        self.index().messages.remove(queue);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, payload: &str) -> EventRecord {
        EventRecord::new(
            uuid::Uuid::new_v4().to_string(),
            name.into(),
            payload.into(),
            None,
        )
    }

    #[test]
    fn events_survive_reopen_and_finish_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events/queue.redb");
        let q = EventQueue::open(&path).unwrap();
        let a = q.enqueue(&record("f", r#"{"n":1}"#)).unwrap();
        let b = q.enqueue(&record("f", r#"{"n":2}"#)).unwrap();
        assert_eq!(q.stats().depth, 2);
        let Take::Ready(first) = q.take_due(now_ms()) else {
            panic!("nothing due")
        };
        assert_eq!(first, a);
        assert_eq!(q.stats().in_flight, 1);
        q.finish(
            a,
            &[Followup::Message {
                queue: "dlq".into(),
                body: "gone".into(),
            }],
        )
        .unwrap();
        // b is held when the "agent" goes away: it comes back after a reopen.
        assert_eq!(q.take_due(now_ms()), Take::Ready(b));
        drop(q);

        let q = EventQueue::open(&path).unwrap();
        let s = q.stats();
        assert_eq!((s.depth, s.in_flight, s.queued_messages), (1, 0, 1));
        assert!(s.oldest_age.is_some());
        assert_eq!(q.take_due(now_ms()), Take::Ready(b));
        assert_eq!(q.get(b).unwrap().unwrap().payload, r#"{"n":2}"#);
        let msgs = q.messages("dlq").unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].body, "gone");
        assert!(q.messages("other").unwrap().is_empty());
        assert_eq!(
            q.queues(),
            vec![QueueSummary {
                name: "dlq".into(),
                messages: 1
            }]
        );
        // New ids never collide with the ones still stored.
        let c = q.enqueue(&record("f", "{}")).unwrap();
        assert!(c > b);
        assert_eq!(q.purge("dlq").unwrap(), 1);
        assert!(q.messages("dlq").unwrap().is_empty());
    }

    #[test]
    fn rescheduled_events_wait_until_due() {
        let dir = tempfile::tempdir().unwrap();
        let q = EventQueue::open(&dir.path().join("q.redb")).unwrap();
        let id = q.enqueue(&record("f", "{}")).unwrap();
        assert_eq!(q.take_due(now_ms()), Take::Ready(id));
        assert_eq!(q.take_due(now_ms()), Take::Empty);
        let mut r = q.get(id).unwrap().unwrap();
        r.attempts = 1;
        r.due_at_ms = now_ms() + 60_000;
        q.reschedule(id, &r).unwrap();
        assert!(matches!(q.take_due(now_ms()), Take::Wait(d) if d > Duration::from_secs(50)));
        assert_eq!(q.take_due(now_ms() + 61_000), Take::Ready(id));
        q.finish(id, &[Followup::Event(record("g", r#"{"from":"f"}"#))])
            .unwrap();
        let Take::Ready(next) = q.take_due(now_ms()) else {
            panic!("the destination event is not due")
        };
        assert_eq!(q.get(next).unwrap().unwrap().function, "g");
        assert_eq!(q.get(id).unwrap(), None);
    }
}
