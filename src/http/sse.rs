//! Server-Sent Events of one object's changes (an OTA task, a rollout): its state now, then
//! one event per change taken from a broadcast channel, until the object says it is done or
//! the server begins to shut down (clients reconnect to the next instance).

use actix_web::HttpResponse;
use actix_web::http::header;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// What the stream needs to know of each change.
pub(super) trait Tracked: Clone + Send + 'static {
    /// The SSE event name.
    const EVENT: &'static str;
    /// Whether this change belongs to the streamed object.
    fn is(&self, id: &str) -> bool;
    /// Whether nothing will change any more (the stream ends after this event).
    fn done(&self) -> bool;
    /// The event's data (JSON).
    fn data(&self) -> String;
}

fn event<T: Tracked>(t: &T) -> Bytes {
    Bytes::from(format!("event: {}\ndata: {}\n\n", T::EVENT, t.data()))
}

/// The `text/event-stream` response for `first` and its later changes from `rx`.
pub(super) fn stream<T: Tracked>(
    first: T,
    id: String,
    rx: broadcast::Receiver<T>,
    stopping: CancellationToken,
) -> HttpResponse {
    let done = first.done();
    let head =
        futures::stream::once(async move { Ok::<_, std::convert::Infallible>(event(&first)) });
    let rest = futures::stream::unfold((rx, done, id), move |(mut rx, done, id)| {
        let stopping = stopping.clone();
        async move {
            if done {
                return None;
            }
            loop {
                let next = tokio::select! {
                    _ = stopping.cancelled() => return None,
                    next = rx.recv() => next,
                };
                match next {
                    Ok(t) if t.is(&id) => {
                        let done = t.done();
                        return Some((Ok(event(&t)), (rx, done, id)));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(head.chain(rest))
}
