//! Copies bytes both ways between two streams, carrying a half-close across (EOF on one side
//! shuts down the other's write half), counting bytes as they pass.
//!
//! Unlike `tokio::io::copy_bidirectional`, a direction holds a buffer only while it has bytes in
//! hand: when a read would block, the buffer goes back to a small per-thread free list. An idle
//! connection therefore costs its sockets and its task, not 2 × 8 KiB (tokio) or more.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Large enough for one HTTP/2 frame (32 KiB) of payload per read.
pub const BUFFER_SIZE: usize = 32 * 1024;
/// Buffers kept per thread for reuse; beyond that they are freed.
const FREE_LIST_LIMIT: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Box<[u8]> {
    FREE.with_borrow_mut(|free| free.pop())
        .unwrap_or_else(|| vec![0; BUFFER_SIZE].into_boxed_slice())
}

fn give_back(buffer: Box<[u8]>) {
    FREE.with_borrow_mut(|free| {
        if free.len() < FREE_LIST_LIMIT {
            free.push(buffer);
        }
    });
}

/// One direction's progress.
#[derive(Debug, Default)]
struct Direction {
    /// `Some` only while `buffer[start..end]` still has to be written.
    buffer: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    total: u64,
    needs_flush: bool,
    read_done: bool,
    finished: bool,
}

impl Direction {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        counter: &Counter,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(self.total));
        }
        loop {
            if self.buffer.is_none() && !self.read_done {
                let mut buffer = take_buffer();
                let mut read = ReadBuf::new(&mut buffer);
                match reader.as_mut().poll_read(cx, &mut read) {
                    Poll::Pending => {
                        give_back(buffer);
                        if self.needs_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.needs_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(error)) => {
                        give_back(buffer);
                        return Poll::Ready(Err(error));
                    }
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        if n == 0 {
                            give_back(buffer);
                            self.read_done = true;
                        } else {
                            counter.inc_by(n as u64);
                            (self.start, self.end) = (0, n);
                            self.buffer = Some(buffer);
                        }
                    }
                }
            }
            if let Some(buffer) = &self.buffer {
                while self.start < self.end {
                    let n = ready!(writer.as_mut().poll_write(cx, &buffer[self.start..self.end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.start += n;
                    self.total += n as u64;
                    self.needs_flush = true;
                }
                give_back(self.buffer.take().expect("checked above"));
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(self.total));
            }
        }
    }
}

/// Bytes copied `a → b` and `b → a`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Copies until both directions reached EOF (or one failed). `a_to_b` and `b_to_a` are bumped
/// as bytes are read, so they are right even when the copy ends with an error.
pub async fn copy_bidirectional<A, B>(
    a: &mut A,
    b: &mut B,
    a_to_b: &Counter,
    b_to_a: &Counter,
) -> io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut forward, mut backward) = (Direction::default(), Direction::default());
    poll_fn(|cx| {
        let there = forward.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b), a_to_b)?;
        let back = backward.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a), b_to_a)?;
        match (there, back) {
            (Poll::Ready(a_to_b), Poll::Ready(b_to_a)) => Poll::Ready(Ok(Transferred { a_to_b, b_to_a })),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let (up, down) = (Counter::default(), Counter::default());
        let copier = {
            let (up, down) = (up.clone(), down.clone());
            tokio::spawn(async move { copy_bidirectional(&mut proxy_a, &mut proxy_b, &up, &down).await })
        };
        let request: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = request.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, request, "request bytes arrive intact, then EOF (half-close)");
        server.write_all(b"after the client's half-close").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"after the client's half-close");
        let transferred = copier.await.unwrap().unwrap();
        assert_eq!(
            transferred,
            Transferred {
                a_to_b: 200_000,
                b_to_a: 29
            }
        );
        assert_eq!((up.get(), down.get()), (200_000, 29));
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (_client, mut proxy_a) = tokio::io::duplex(64);
        let (mut proxy_b, _server) = tokio::io::duplex(64);
        let (mut forward, mut backward) = (Direction::default(), Direction::default());
        let counter = Counter::default();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(
            forward
                .poll_copy(&mut cx, Pin::new(&mut proxy_a), Pin::new(&mut proxy_b), &counter)
                .is_pending()
        );
        assert!(
            backward
                .poll_copy(&mut cx, Pin::new(&mut proxy_b), Pin::new(&mut proxy_a), &counter)
                .is_pending()
        );
        assert!(forward.buffer.is_none() && backward.buffer.is_none());
    }
}
