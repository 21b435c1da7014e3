//! The connection below actix-http. actix-http answers a request it cannot parse (a URL over
//! 64 KiB, a negative `Content-Length`, a malformed header: 400), a head over 128 KiB (431) and
//! a head that does not arrive in time (408) by itself, before any application code runs, with
//! an empty body. [`JsonErrorIo`] wraps each accepted connection and gives exactly those
//! answers the JSON error body every other error has (contract §2).
//!
//! Invariant: only a response that is a whole head with `content-length: 0`, a 4xx status and
//! no body in the same write is rewritten. Every answer of the application carries a body (its
//! JSON error) or a non-error status, so it passes untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use actix_web::ResponseError;
use actix_web::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection whose framework-generated error answers get a JSON body.
pub struct JsonErrorIo<T> {
    inner: T,
    /// A rewritten answer still to be written (its original length was reported written).
    pending: Vec<u8>,
    sent: usize,
}

impl<T> JsonErrorIo<T> {
    /// Wraps an accepted connection.
    pub fn new(inner: T) -> JsonErrorIo<T> {
        JsonErrorIo {
            inner,
            pending: Vec::new(),
            sent: 0,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncWrite + Unpin> JsonErrorIo<T> {
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonErrorIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonErrorIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.drain(cx))?;
        if let Some(rewritten) = rewrite_error_head(buf) {
            this.pending = rewritten;
            // Written as far as the caller knows; flush and shutdown drain the rest.
            if let Poll::Ready(Err(e)) = this.drain(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The answer `buf` with a JSON error body, if `buf` is exactly one bodiless 4xx answer
/// (`content-length: 0`) as actix-http writes for a request it could not parse.
///
/// ```
/// use fwrepo::http::conn::rewrite_error_head;
/// let out = rewrite_error_head(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").unwrap();
/// let text = String::from_utf8(out).unwrap();
/// assert!(text.contains("content-type: application/json\r\n"));
/// assert!(text.ends_with(r#"{"error":"invalid_request","message":"malformed request"}"#));
/// assert!(rewrite_error_head(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
/// ```
pub fn rewrite_error_head(buf: &[u8]) -> Option<Vec<u8>> {
    if !buf.starts_with(b"HTTP/1.") || buf.len() < 12 || buf.len() > 4096 {
        return None;
    }
    let head_len = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if head_len != buf.len() {
        return None;
    }
    let status = std::str::from_utf8(&buf[9..12]).ok()?.parse::<u16>().ok()?;
    if !(400..500).contains(&status) {
        return None;
    }
    let head = std::str::from_utf8(&buf[..head_len - 2]).ok()?;
    let mut lines: Vec<&str> = head.split("\r\n").filter(|l| !l.is_empty()).collect();
    let length_at = lines.iter().position(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("content-length") && value.trim() == "0"
        })
    })?;
    if lines.iter().any(|l| {
        l.split_once(':')
            .is_some_and(|(name, _)| name.trim().eq_ignore_ascii_case("content-type"))
    }) {
        return None;
    }
    let error = super::error::for_status(StatusCode::from_u16(status).ok()?);
    let body = error.error_response().into_body();
    let body = actix_web::body::MessageBody::try_into_bytes(body).ok()?;
    let length = format!("content-length: {}", body.len());
    lines[length_at] = &length;
    let mut out = Vec::with_capacity(head_len + 64 + body.len());
    for line in lines {
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"content-type: application/json\r\n\r\n");
    out.extend_from_slice(&body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: Option<Vec<u8>>) -> Option<String> {
        b.map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn only_bodiless_framework_errors_are_rewritten() {
        let bad = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\ndate: Mon, 07 Dec 2026 00:00:00 GMT\r\n\r\n";
        let out = text(rewrite_error_head(bad)).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "invalid_request");

        let big = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert!(
            text(rewrite_error_head(big))
                .unwrap()
                .contains("\"error\":")
        );
        let slow = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n";
        assert!(rewrite_error_head(slow).is_some());

        for untouched in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-length: 54\r\ncontent-type: application/json\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ncontent-type: text/plain\r\n\r\n",
            b"some body bytes",
        ] {
            assert!(
                rewrite_error_head(untouched).is_none(),
                "{}",
                String::from_utf8_lossy(untouched)
            );
        }
    }

    #[tokio::test]
    async fn the_wrapper_writes_the_rewritten_answer_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(64);
        let mut io = JsonErrorIo::new(server);
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut all = String::new();
            client.read_to_string(&mut all).await.unwrap();
            all
        });
        let n = io
            .write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(n, 47);
        io.shutdown().await.unwrap();
        drop(io);
        let all = reader.await.unwrap();
        assert!(all.ends_with("\"}"), "{all}");
        assert!(all.contains("content-type: application/json"), "{all}");
    }
}
