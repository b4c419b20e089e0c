//! The socket under an HBONE connection's TLS. rustls reads the socket 4 KiB at a time; a buffer
//! under TLS makes that one read syscall per 64 KiB, per connection (shared by all its streams).
//! The buffer is allocated only once the handshake is done: a connection still in its handshake
//! (and a flood of half-open ones) costs no more than rustls's own state.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

const CAPACITY: usize = 64 * 1024;

/// A TCP stream, read through a buffer once [`Transport::buffer`] was called.
#[derive(Debug)]
pub struct Transport {
    inner: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
}

impl Transport {
    pub fn new(tcp: TcpStream) -> Self {
        let _ = tcp.set_nodelay(true);
        Self {
            inner: tcp,
            buf: Box::default(),
            pos: 0,
            filled: 0,
        }
    }

    /// Reads go through the 64 KiB buffer from now on (call it once the handshake is done).
    pub fn buffer(&mut self) {
        if self.buf.is_empty() {
            self.buf = vec![0; CAPACITY].into_boxed_slice();
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.filled {
            // Nothing buffered: unbuffered yet, or a read as large as the buffer, goes straight.
            if this.buf.is_empty() || out.remaining() >= this.buf.len() {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let mut fill = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut fill))?;
            (this.pos, this.filled) = (0, fill.filled().len());
        }
        let n = out.remaining().min(this.filled - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn bytes_arrive_intact_before_and_after_buffering_starts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut transport = Transport::new(server);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let mut client = client;
            client.write_all(&sent).await.unwrap();
        });
        let mut received = vec![0u8; 1000];
        transport.read_exact(&mut received).await.unwrap();
        assert!(transport.buf.is_empty(), "no buffer before it is asked for");
        transport.buffer();
        let mut small = [0u8; 7];
        while received.len() < data.len() {
            let n = transport.read(&mut small).await.unwrap();
            received.extend_from_slice(&small[..n]);
        }
        writer.await.unwrap();
        assert!(received == data, "intact");
    }
}
