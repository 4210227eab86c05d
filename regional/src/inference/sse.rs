//! The `data:` payloads of an upstream's server-sent events, as they
//! arrive: what every protocol's stream reader starts from.

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::error::Error;

/// Each `data:` field of `response`'s body, trimmed; other fields (`event:`,
/// `id:`, comments) carry nothing the readers use. A body that breaks off
/// ends the stream with an error naming `origin`.
pub(super) fn data(
    response: reqwest::Response,
    origin: &str,
) -> BoxStream<'static, Result<String, Error>> {
    let origin = origin.to_string();
    async_stream::stream! {
        let mut body = response.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(bytes) = body.next().await {
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => {
                    yield Err(Error::Unavailable(format!("upstream {origin} broke off: {e}")));
                    return;
                }
            };
            buf.extend_from_slice(&bytes);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                if let Some(data) = line.trim_end().strip_prefix("data:") {
                    yield Ok(data.trim_start().to_string());
                }
            }
        }
    }
    .boxed()
}
