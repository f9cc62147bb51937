//! The 414 written on the raw socket, before hyper parses the head.
//!
//! hyper already answers 400 for conflicting `Content-Length`s, a signed or
//! non-numeric one, bad chunk sizes and spaces before a colon, and 431 for a
//! head over `max_header_bytes`; `connection` makes it refuse bare LFs and
//! heads framed by both `Content-Length` and `Transfer-Encoding` (hyper drops
//! one of the two before any handler could see them). What is left is a URI
//! longer than `max_uri_bytes`: 414. A URI short enough to be buffered is
//! checked on the parsed request (the app's `check_uri`); a request line longer than
//! that is cut off by the socket wrapper, which answers 414 itself
//! ([`Refusal`]) before hyper would count the line against the head limit
//! and say 431.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Room in a request line for the method, spaces and version: a line longer
/// than `max_uri_bytes` + this carries a URI over the limit.
pub const REQUEST_LINE_SLACK: usize = 32;

/// The same answer the app's `check_uri` error gets from its pages.
const URI_TOO_LONG: &[u8] = b"HTTP/1.1 414 URI Too Long\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 13\r\nconnection: close\r\n\r\nURI Too Long\n";

/// How long, and how much, the rest of a refused request is read and
/// dropped after the answer. Closing a socket with unread bytes makes the
/// kernel reset the connection, and a reset can destroy the answer before
/// the client reads it (nginx's lingering close does the same).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Answers 414 on the raw socket, closes the sending side, and drains what
/// the client still sends; then reports end of stream, so hyper sees a
/// client that went away mid-head and closes without an answer of its own.
pub struct Refusal {
    written: usize,
    shut: bool,
    drained: usize,
    linger: Option<Pin<Box<Sleep>>>,
}

impl Refusal {
    pub fn uri_too_long() -> Refusal {
        Refusal {
            written: 0,
            shut: false,
            drained: 0,
            linger: None,
        }
    }

    pub fn poll<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.written < URI_TOO_LONG.len() {
            match Pin::new(&mut *io).poll_write(cx, &URI_TOO_LONG[self.written..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Pending => return Poll::Pending,
            }
        }
        if !self.shut {
            if Pin::new(&mut *io).poll_shutdown(cx).is_pending() {
                return Poll::Pending;
            }
            self.shut = true;
        }
        let linger = self.linger.get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
        if linger.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        let mut scratch = [0u8; 8192];
        while self.drained < LINGER_BYTES {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => self.drained += buf.filled().len(),
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}
