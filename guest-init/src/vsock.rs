//! The guest's end of the host connection: an `AF_VSOCK` stream to the host, driven by tokio.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A `sockaddr_vm` for `cid:port`.
pub fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

/// Connects to `cid:port` (blocking), retrying while nobody listens yet, for up to
/// `timeout`. The host's listener normally exists before the VM starts, so the first try
/// usually succeeds.
pub fn connect(cid: u32, port: u32, timeout: Duration) -> io::Result<OwnedFd> {
    let start = Instant::now();
    loop {
        // SAFETY: plain socket(2); the result is checked.
        let raw = check(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: raw was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = vsock_addr(cid, port);
        // SAFETY: addr is a valid sockaddr_vm and the length is its size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(fd);
        }
        let e = io::Error::last_os_error();
        let retry = matches!(
            e.raw_os_error(),
            Some(libc::ECONNRESET | libc::ECONNREFUSED | libc::ETIMEDOUT | libc::EINTR)
        );
        if !retry || start.elapsed() >= timeout {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Any connected stream socket (vsock, or a Unix socket in tests) as a tokio stream.
///
/// A reader also watches for `EPOLLERR`: Linux's virtio-vsock driver kills connected sockets
/// on a transport reset (as after a snapshot restore) by setting only `sk_err`, so epoll reports
/// `EPOLLERR` without `EPOLLIN`/`EPOLLHUP`, and tokio wakes neither the read readiness slot nor
/// (when nothing is being written) the write slot. Without the watch a reader waits forever on
/// a dead connection.
pub struct FdStream {
    fd: Arc<AsyncFd<OwnedFd>>,
    /// Completes once the socket reports an error condition; `None` once it has.
    error_watch: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl FdStream {
    /// Makes `fd` non-blocking and registers it with the current tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: fcntl on a descriptor we own; no pointers.
        let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
        // SAFETY: as above.
        check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
        // SAFETY: an OwnedFd keeps its descriptor open, and as_raw_fd returns that same
        // descriptor, for as long as the AsyncFd owns it.
        let fd = unsafe {
            AsyncFd::register_with_interest(
                fd,
                Interest::READABLE | Interest::WRITABLE | Interest::ERROR,
            )
        }
        .map_err(io::Error::from)?;
        let fd = Arc::new(fd);
        let watched = fd.clone();
        let error_watch: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
            // An error from `ready` itself (runtime shutting down) also ends the watch: the
            // read that follows then reports whatever state the socket is in.
            let _ = watched.ready(Interest::ERROR).await;
        });
        Ok(FdStream {
            fd,
            error_watch: Some(error_watch),
        })
    }

    /// Whether the socket has reported an error condition (polling the watch registers the
    /// task's waker for it).
    fn poll_errored(&mut self, cx: &mut Context<'_>) -> bool {
        match self.error_watch.as_mut() {
            None => true,
            Some(w) => {
                if w.as_mut().poll(cx).is_ready() {
                    self.error_watch = None;
                    true
                } else {
                    false
                }
            }
        }
    }
}

/// read(2) into `buf`.
fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: read(2) into `buf`, which is valid for its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = match this.fd.poll_read_ready(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => {
                    if !this.poll_errored(cx) {
                        return Poll::Pending;
                    }
                    // Error condition without read readiness: the read reports it (or EOF).
                    let unfilled = buf.initialize_unfilled();
                    return Poll::Ready(match read_fd(this.fd.get_ref(), unfilled) {
                        Ok(n) => {
                            buf.advance(n);
                            Ok(())
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            "the socket reported an error condition",
                        )),
                        Err(e) => Err(e),
                    });
                }
            };
            let unfilled = buf.initialize_unfilled();
            let result = guard.try_io(|fd| read_fd(fd.get_ref(), unfilled));
            match result {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let result = guard.try_io(|fd| {
                // SAFETY: send(2) from `data`, valid for its length; MSG_NOSIGNAL so a closed
                // peer is an EPIPE error, not a signal.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        data.as_ptr().cast(),
                        data.len(),
                        libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown(2) on a socket we own; no pointers.
        let rc = unsafe { libc::shutdown(self.fd.get_ref().as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(check(rc).map(|_| ()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn vsock_address_layout() {
        let a = vsock_addr(crate::proto::HOST_CID, 9999);
        assert_eq!(a.svm_family, libc::AF_VSOCK as libc::sa_family_t);
        assert_eq!((a.svm_cid, a.svm_port), (2, 9999));
        assert_eq!(std::mem::size_of::<libc::sockaddr_vm>(), 16);
    }

    #[tokio::test]
    async fn fd_stream_carries_bytes_both_ways_and_sees_eof() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut a = FdStream::new(OwnedFd::from(a)).unwrap();
        let mut b = FdStream::new(OwnedFd::from(b)).unwrap();
        let big = vec![0xa5u8; 1 << 20];
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        b.write_all(b"bye").await.unwrap();
        drop(b);
        assert_eq!(writer.await.unwrap(), b"bye");
    }
}
