//! A body that passes every frame through unchanged while something
//! watches them go by: the connection's phase, the access log's byte
//! counts, the session's activity. Each concern is a [`Watch`]; a body can
//! be watched by several, one wrapper each, all resolved at compile time.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};

/// What a watcher is told. Whatever it does when the body is dropped (the
/// exchange is over, finished or not) goes in its own `Drop`.
pub trait Watch {
    /// A data frame of `bytes` bytes went by.
    fn data(&mut self, _bytes: u64) {}
    /// The body ended (its last frame went by).
    fn end(&mut self) {}
}

pub struct Watched<B, W> {
    inner: B,
    pub watch: W,
}

impl<B, W> Watched<B, W> {
    pub fn new(inner: B, watch: W) -> Self {
        Watched { inner, watch }
    }
}

impl<B, W> Body for Watched<B, W>
where
    B: Body + Unpin,
    B::Data: Buf,
    W: Watch + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.watch.data(data.remaining() as u64);
                }
            }
            Poll::Ready(None) => this.watch.end(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    #[derive(Default)]
    struct Seen {
        bytes: u64,
        frames: usize,
        ended: bool,
    }

    impl Watch for &mut Seen {
        fn data(&mut self, bytes: u64) {
            self.bytes += bytes;
            self.frames += 1;
        }
        fn end(&mut self) {
            self.ended = true;
        }
    }

    #[tokio::test]
    async fn frames_pass_unchanged_and_the_watcher_sees_each_and_the_end() {
        let parts = ["ab", "", "cde"].map(|p| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(p))));
        let mut seen = Seen::default();
        let body = Watched::new(StreamBody::new(futures_util::stream::iter(parts)), &mut seen);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcde");
        assert_eq!((seen.bytes, seen.frames, seen.ended), (5, 3, true));
    }
}
