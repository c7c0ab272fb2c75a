//! The events of a running background response, kept in memory so that any number of
//! readers may follow them from any point: the client that created it streamed, and one
//! that comes back after losing its connection (`GET /v1/responses/{id}?stream=true
//! &starting_after=N`). An event's place in the log is its `sequence_number`. A log is
//! kept [`LINGER`] after its response ends, then dropped (the stored answer remains).

use axum::body::Body;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// How long a finished response's events can still be streamed again.
pub const LINGER: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct EventLog {
    /// Whole SSE events (`event: …\ndata: …\n\n`), in order.
    events: Mutex<Vec<Bytes>>,
    done: AtomicBool,
    notify: Notify,
}

impl EventLog {
    /// Adds the next event.
    pub fn push(&self, event: Bytes) {
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
        self.notify.notify_waiters();
    }

    /// No more events: readers end once they have read them all.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// How many events so far.
    pub fn count(&self) -> usize {
        self.events.lock().map_or(0, |e| e.len())
    }

    /// The event at `i` once there is one; `None` when the log ended before it.
    async fn at(&self, i: usize) -> Option<Bytes> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before looking, so that a push in between is not missed.
            notified.as_mut().enable();
            if let Some(e) = self.events.lock().ok()?.get(i) {
                return Some(e.clone());
            }
            if self.done.load(Ordering::Acquire) {
                return None;
            }
            notified.await;
        }
    }

    /// An SSE body of the events from `from` on, following the log to its end.
    pub fn follow(self: Arc<Self>, from: usize) -> Body {
        let events = futures::stream::unfold(from, move |i| {
            let log = self.clone();
            async move {
                let e = log.at(i).await?;
                Some((Ok::<_, std::convert::Infallible>(e), i + 1))
            }
        });
        Body::from_stream(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn readers_follow_from_where_they_ask_until_the_end() {
        let log = Arc::new(EventLog::default());
        log.push(Bytes::from_static(b"a"));
        let all = tokio::spawn(log.clone().follow(0).collect());
        let late = tokio::spawn(log.clone().follow(1).collect());
        for e in [&b"b"[..], b"c"] {
            tokio::time::sleep(Duration::from_millis(5)).await;
            log.push(Bytes::copy_from_slice(e));
        }
        log.finish();
        let all = all.await.expect("a reader").expect("a body").to_bytes();
        let late = late.await.expect("a reader").expect("a body").to_bytes();
        assert_eq!((&all[..], &late[..]), (&b"abc"[..], &b"bc"[..]));
        // After the end: what there was, at once.
        let again = log.clone().follow(2).collect().await.expect("a body");
        assert_eq!(&again.to_bytes()[..], b"c");
        assert_eq!(log.count(), 3);
    }
}
