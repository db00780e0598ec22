//! The one place that touches inotify's stream type: the policy watcher
//! (`daemon`) and the GameMode supervisor (`gamemode_bus`) read events
//! through it.

use std::{ffi::OsString, pin::Pin, task::Poll};

use futures_core::Stream as _;
use inotify::EventStream;

/// The name in the next event (None for events without one); None at the
/// end.
pub async fn next_event(stream: &mut EventStream<Vec<u8>>) -> Option<Option<OsString>> {
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx))
        .await
        .and_then(Result::ok)
        .map(|event| event.name)
}

/// Reads the events already queued without waiting for more: a burst is
/// handled once. Returns false when the stream has ended.
pub async fn skip_queued(stream: &mut EventStream<Vec<u8>>) -> bool {
    std::future::poll_fn(|cx| {
        loop {
            match Pin::new(&mut *stream).poll_next(cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(_) => return Poll::Ready(false),
                Poll::Pending => return Poll::Ready(true),
            }
        }
    })
    .await
}
