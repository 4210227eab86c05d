//! What every HTTP answer of a fuzz case must be: a 2xx, or a 4xx whose body
//! is an OpenAI-style error; never a 5xx, a dropped connection or a hang.

use std::time::Duration;

use serde_json::Value;

use crate::runner::Verdict;

/// Longer than any sane answer of a simulated model: past it, the case hung.
const CASE_TIMEOUT: Duration = Duration::from_secs(20);

/// Posts `body` and checks the answer.
pub(crate) async fn post(
    http: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Verdict {
    let sent = http
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .timeout(CASE_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("POST {url}: no answer: {e:?}"))?;
    let status = sent.status();
    let streamed = sent
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let bytes = sent
        .bytes()
        .await
        .map_err(|e| format!("POST {url}: {status}, body cut: {e:?}"))?;
    let text = String::from_utf8_lossy(&bytes);
    if status.is_server_error() {
        return Err(format!("POST {url}: {status}: {text}"));
    }
    if status.is_client_error() {
        return openai_error(&bytes).map_err(|e| format!("POST {url}: {status}: {e}: {text}"));
    }
    if streamed {
        // Errors after the headers go out as an `error` event, which must
        // still be one (not a broken stream); the last event is [DONE].
        for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if data != "[DONE]" {
                serde_json::from_str::<Value>(data)
                    .map_err(|e| format!("POST {url}: event is not JSON: {e}: {data}"))?;
            }
        }
        return Ok(());
    }
    serde_json::from_slice::<Value>(&bytes)
        .map(drop)
        .map_err(|e| format!("POST {url}: {status} body is not JSON: {e}: {text}"))
}

/// `{"error": {"message": "...", "type": "..."}}`, with a message.
fn openai_error(bytes: &[u8]) -> Verdict {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("error body is not JSON: {e}"))?;
    let error = v.get("error").ok_or("no `error` member")?;
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .ok_or("no `error.message`")?;
    if message.is_empty() {
        return Err("empty `error.message`".into());
    }
    error
        .get("type")
        .and_then(Value::as_str)
        .ok_or("no `error.type`")?;
    Ok(())
}

/// The node's liveness after a run: `/healthz` answers `ok`.
pub(crate) async fn assert_up(http: &reqwest::Client, base: &str) {
    let res = http
        .get(format!("{base}/healthz"))
        .timeout(CASE_TIMEOUT)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{base} is down after the run: {e}"));
    assert!(
        res.status().is_success(),
        "{base}/healthz: {}",
        res.status()
    );
}

/// Bytes that are mostly JSON text with a few corrupted, for parsers' edges.
pub(crate) fn corrupt(mut bytes: Vec<u8>, edits: &[(usize, u8)]) -> Vec<u8> {
    for (at, b) in edits {
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] = *b;
        }
    }
    bytes
}
