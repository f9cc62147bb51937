//! Wrappers that record activity on the session while bytes move: around a
//! streamed body (every data frame) and around an upgraded socket (every
//! read). An open stream that carries nothing records nothing.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::{Watch, Watched};
use crate::session::Session;

/// Watches a body: every data frame touches the session (when the exchange
/// counts as activity).
pub struct Touch(pub Option<Arc<Session>>);

impl Watch for Touch {
    fn data(&mut self, _bytes: u64) {
        if let Some(session) = &self.0 {
            session.activity.touch();
        }
    }
}

/// A body that keeps its session active while its bytes move.
pub type ActivityBody<B> = Watched<B, Touch>;

/// A socket that touches the session whenever bytes are read from it.
pub struct ActivityIo<T> {
    inner: T,
    session: Arc<Session>,
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T, session: Arc<Session>) -> Self {
        ActivityIo { inner, session }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.session.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
