//! The event log: every event gets a sequence number that grows across
//! daemon restarts, is kept in a bounded backlog for clients that reconnect
//! with `since`, and is broadcast to live subscribers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use mariesync_protocol::ipc::{EVENT_BACKLOG_MAX, event_kind};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

pub struct EventLog {
    inner: Mutex<Inner>,
    sender: broadcast::Sender<Arc<Value>>,
}

struct Inner {
    next_seq: u64,
    backlog: VecDeque<(u64, Arc<Value>)>,
}

/// What a new subscriber gets: missed events to replay, then a live stream.
pub struct Subscription {
    pub replay: Vec<Arc<Value>>,
    pub live: broadcast::Receiver<Arc<Value>>,
    /// The sequence number of the newest event at subscription time.
    pub last_seq: u64,
}

impl EventLog {
    /// `first_seq`: the first sequence number of this run; it must exceed
    /// every number an earlier run handed out.
    pub fn new(first_seq: u64) -> EventLog {
        let (sender, _) = broadcast::channel(4096);
        EventLog {
            inner: Mutex::new(Inner {
                next_seq: first_seq,
                backlog: VecDeque::new(),
            }),
            sender,
        }
    }

    /// Publishes an event of `kind`; `fields` must be a JSON object.
    pub fn publish(&self, kind: &str, fields: Value) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let mut object = match fields {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        object.insert("seq".into(), seq.into());
        object.insert("kind".into(), kind.into());
        let event = Arc::new(Value::Object(object));
        if inner.backlog.len() == EVENT_BACKLOG_MAX {
            inner.backlog.pop_front();
        }
        inner.backlog.push_back((seq, event.clone()));
        // Sending while holding the lock keeps replay and live stream in one order.
        let _ = self.sender.send(event);
    }

    pub fn last_seq(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_seq
            - 1
    }

    /// Subscribes. With `since`, the events after it are replayed; if some of
    /// them are no longer kept, a `gap` event says which were lost.
    pub fn subscribe(&self, since: Option<u64>) -> Subscription {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.sender.subscribe();
        let last_seq = inner.next_seq - 1;
        let mut replay = Vec::new();
        if let Some(since) = since {
            let oldest = inner
                .backlog
                .front()
                .map(|(seq, _)| *seq)
                .unwrap_or(inner.next_seq);
            if since.saturating_add(1) < oldest {
                replay.push(Arc::new(json!({
                    "seq": oldest.saturating_sub(1),
                    "kind": event_kind::GAP,
                    "from": since.saturating_add(1),
                    "to": oldest - 1,
                    "message": "events between these sequence numbers are no longer kept; re-read the state you need",
                })));
            }
            replay.extend(
                inner
                    .backlog
                    .iter()
                    .filter(|(seq, _)| *seq > since)
                    .map(|(_, e)| e.clone()),
            );
        }
        Subscription {
            replay,
            live,
            last_seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_what_was_missed_and_reports_gaps() {
        let log = EventLog::new(1000);
        for i in 0..5 {
            log.publish("test", json!({ "i": i }));
        }
        let sub = log.subscribe(Some(1002));
        let seqs: Vec<u64> = sub
            .replay
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![1003, 1004]);
        // A seq from before this run started: everything kept, plus a gap.
        let sub = log.subscribe(Some(10));
        assert_eq!(sub.replay[0]["kind"], "gap");
        assert_eq!(sub.replay[0]["from"], 11);
        assert_eq!(sub.replay.len(), 6);
    }
}
