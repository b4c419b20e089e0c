//! Protocol detection on a stream's first bytes: HTTP/2's preface, an HTTP/1.1 method, or
//! anything else. The bytes read are replayed ([`Rewind`]) to whoever serves the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

const METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// Enough to tell every method and the preface apart.
const SNIFF_LENGTH: usize = 14;
/// A client that says nothing first (a server-speaks-first protocol) is carried as TCP.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(1);

/// What `bytes` (the stream's start, possibly short) look like; `None` while undecided.
pub fn classify(bytes: &[u8], ended: bool) -> Option<Protocol> {
    if bytes.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if let Some(space) = bytes.iter().position(|b| *b == b' ') {
        return Some(if METHODS.contains(&&bytes[..space]) {
            Protocol::Http1
        } else {
            Protocol::Opaque
        });
    }
    let could_be = H2_PREFACE.starts_with(bytes) || METHODS.iter().any(|m| m.starts_with(bytes));
    (!could_be || ended || bytes.len() >= SNIFF_LENGTH).then_some(Protocol::Opaque)
}

/// Reads until the protocol is known (or the client is silent for a second).
pub async fn sniff<T: AsyncRead + Unpin>(mut stream: T) -> io::Result<(Protocol, Rewind<T>)> {
    let mut read = BytesMut::with_capacity(SNIFF_LENGTH);
    let protocol = loop {
        if let Some(protocol) = classify(&read, false) {
            break protocol;
        }
        let mut chunk = [0u8; SNIFF_LENGTH];
        let want = SNIFF_LENGTH - read.len();
        match tokio::time::timeout(SNIFF_TIMEOUT, stream.read(&mut chunk[..want])).await {
            Err(_) => break Protocol::Opaque,
            Ok(Ok(0)) => break classify(&read, true).unwrap_or(Protocol::Opaque),
            Ok(Ok(n)) => read.extend_from_slice(&chunk[..n]),
            Ok(Err(error)) => return Err(error),
        }
    };
    Ok((
        protocol,
        Rewind {
            prefix: read.freeze(),
            inner: stream,
        },
    ))
}

/// A stream whose first bytes were already read: they come out first.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// The stream itself (bytes already replayed or not are gone).
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn methods_preface_and_other_bytes_are_told_apart() {
        assert_eq!(classify(b"GET / HTTP/1.1", false), Some(Protocol::Http1));
        assert_eq!(classify(b"DELETE /x", false), Some(Protocol::Http1));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n", false), Some(Protocol::Http2));
        assert_eq!(classify(b"GE", false), None, "could still be GET");
        assert_eq!(classify(b"GE", true), Some(Protocol::Opaque), "ended before a method");
        assert_eq!(
            classify(b"\x16\x03\x01", false),
            Some(Protocol::Opaque),
            "TLS is not HTTP"
        );
        assert_eq!(classify(b"GETX /", false), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn sniffed_bytes_are_replayed() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"GE").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"T /path HTTP/1.1\r\n").await.unwrap();
            client.shutdown().await.unwrap();
        });
        let (protocol, mut stream) = sniff(server).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET /path HTTP/1.1\r\n");
        writer.await.unwrap();
    }
}
