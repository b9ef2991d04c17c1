//! Replies to `ask`, `map` and `join`: correlation ids and the waiters behind them.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::{mpsc, oneshot};

/// Header naming the topic a reply goes to.
pub(crate) const REPLY_TO: &str = "rill-reply-to";
/// Header carrying the request's correlation id.
pub(crate) const CORRELATION_ID: &str = "rill-correlation-id";

enum Waiter {
    One(oneshot::Sender<Bytes>),
    Many(mpsc::UnboundedSender<(String, Bytes)>),
}

/// Requests of this worker that wait for a reply, by correlation id.
pub(crate) struct Replies {
    prefix: String,
    next: AtomicU64,
    pending: Mutex<HashMap<String, Waiter>>,
}

impl Replies {
    pub(crate) fn new(prefix: String) -> Self {
        Self {
            prefix,
            next: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A correlation id unique to this worker.
    pub(crate) fn new_id(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    pub(crate) fn expect_one(&self, id: String) -> oneshot::Receiver<Bytes> {
        let (tx, rx) = oneshot::channel();
        self.pending().insert(id, Waiter::One(tx));
        rx
    }

    pub(crate) fn expect_many(&self, id: String, tx: mpsc::UnboundedSender<(String, Bytes)>) {
        self.pending().insert(id, Waiter::Many(tx));
    }

    pub(crate) fn cancel(&self, id: &str) {
        self.pending().remove(id);
    }

    /// Hands a reply to its waiter; returns false when nobody waits for it (a late reply).
    pub(crate) fn complete(&self, id: &str, value: Bytes) -> bool {
        let waiter = self.pending().remove(id);
        match waiter {
            Some(Waiter::One(tx)) => tx.send(value).is_ok(),
            Some(Waiter::Many(tx)) => tx.send((id.to_owned(), value)).is_ok(),
            None => false,
        }
    }
}
