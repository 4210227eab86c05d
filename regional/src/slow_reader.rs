//! Streams whose reader may stall. A streamed answer holds what produces it
//! (an admission slot and a model's work, a job watch slot, a database
//! snapshot) for as long as the reader takes; a reader that stops reading
//! would hold them forever. [`cut_after`] runs the producer in its own task
//! and hands its items over a small buffer: when the reader has taken
//! nothing for `timeout`, the producer is dropped, which releases what it
//! held, and the reader gets `last` after what was buffered.

use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio_stream::wrappers::ReceiverStream;

/// Items a producer may be ahead of its reader.
const BUFFER: usize = 16;

/// `stream`, cut when its reader takes no item for `timeout`; `what` names
/// the stream in the log line of a cut.
pub(crate) fn cut_after<T: Send + 'static>(
    stream: impl Stream<Item = T> + Send + 'static,
    timeout: Duration,
    what: &'static str,
    last: Option<T>,
) -> ReceiverStream<T> {
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        let mut stream = Box::pin(stream);
        while let Some(item) = stream.next().await {
            match tx.send_timeout(item, timeout).await {
                Ok(()) => {}
                Err(SendTimeoutError::Closed(_)) => return,
                Err(SendTimeoutError::Timeout(_)) => {
                    tracing::warn!(
                        stream = what,
                        timeout_ms = timeout.as_millis() as u64,
                        "reader took nothing in time; stream cut and its resources released"
                    );
                    drop(stream);
                    if let Some(last) = last {
                        // The reader may yet come back for what is buffered.
                        let _ = tx.send_timeout(last, timeout).await;
                    }
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// Sets its flag when dropped, as a producer's permit would be returned.
    struct Held(Arc<AtomicBool>);

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    // A paused clock: the cut comes at 50 ms of the runtime's time, and the
    // reader is back at 75 ms, before the last item's own wait runs out.
    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_reading_releases_the_producer() {
        let released = Arc::new(AtomicBool::new(false));
        let held = Held(released.clone());
        let producer =
            futures::stream::unfold(
                (0u32, held),
                |(n, held)| async move { Some((n, (n + 1, held))) },
            );
        let mut out = cut_after(producer, Duration::from_millis(50), "test", Some(u32::MAX));
        assert_eq!(out.next().await, Some(0));
        tokio::time::sleep(Duration::from_millis(75)).await;
        assert!(released.load(Ordering::SeqCst), "the producer was dropped");
        let rest: Vec<u32> = out.collect().await;
        assert_eq!(rest.last(), Some(&u32::MAX), "the reader learns of the cut");
        assert_eq!(rest.len(), BUFFER + 1);
    }

    #[tokio::test]
    async fn a_reader_that_keeps_reading_gets_everything() {
        let producer = futures::stream::iter(0..100u32);
        let out: Vec<u32> = cut_after(producer, Duration::from_millis(50), "test", None)
            .collect()
            .await;
        assert_eq!(out, (0..100).collect::<Vec<_>>());
    }
}
