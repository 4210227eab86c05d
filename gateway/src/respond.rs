//! The gateway's own answers: an error the client understands, in its own
//! protocol (a trailers-only gRPC status, or OpenAI's JSON error object),
//! with the HTTP status, gRPC code and OpenAI `type` of its
//! [`ErrorClass`], so the gateway and the regions answer the same failure
//! alike. The proxy and the gate both answer through here.

use bytes::Bytes;
use http::{HeaderValue, header};
use meridian_proto::ErrorClass;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

/// One error answer.
pub(crate) struct ErrorReply<'a> {
    pub(crate) class: ErrorClass,
    /// The OpenAI error object's `code`, where there is one.
    pub(crate) code: Option<&'static str>,
    pub(crate) message: &'a str,
    /// Extra response headers (`Retry-After`, `x-ratelimit-*`).
    pub(crate) headers: &'a [(&'static str, HeaderValue)],
}

impl<'a> ErrorReply<'a> {
    /// An answer with no OpenAI `code` and no extra headers.
    pub(crate) fn new(class: ErrorClass, message: &'a str) -> Self {
        Self {
            class,
            code: None,
            message,
            headers: &[],
        }
    }

    /// Writes the answer as the whole response.
    pub(crate) async fn send(&self, session: &mut Session, grpc: bool) -> Result<()> {
        let extra = self.headers;
        if grpc {
            let mut resp = ResponseHeader::build(http::StatusCode::OK, Some(3 + extra.len()))?;
            resp.insert_header(header::CONTENT_TYPE, "application/grpc")?;
            resp.insert_header("grpc-status", i32::from(self.class.grpc_code()).to_string())?;
            resp.insert_header("grpc-message", percent_encode(self.message))?;
            for (name, value) in extra {
                resp.insert_header(*name, value)?;
            }
            return session.write_response_header(Box::new(resp), true).await;
        }
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.class.openai_type(),
                "param": null,
                "code": self.code,
            }
        });
        let body = Bytes::from(body.to_string());
        let mut resp = ResponseHeader::build(self.class.http_status(), Some(2 + extra.len()))?;
        for (name, value) in extra {
            resp.insert_header(*name, value)?;
        }
        resp.insert_header(header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode("50% off: é"), "50%25 off: %C3%A9");
    }
}
