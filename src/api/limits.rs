//! What keeps slow or hostile clients from stalling the node: a cap on
//! connections (in total and per client address), a deadline on a response
//! the client stops reading, and a minimum rate for request bodies. The
//! head of each request has its own deadline in hyper (`header_read_timeout`,
//! set where connections are served). Each bound answers one way a client
//! could hold a resource forever; together they leave normal clients of the
//! same node untouched.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::config::LimitSettings;

/// Counts open connections, in total and per client address.
#[derive(Clone)]
pub struct ConnLimiter {
    inner: Arc<LimiterInner>,
}

struct LimiterInner {
    max_total: usize,
    max_per_client: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it frees its place.
pub struct ConnPermit {
    inner: Arc<LimiterInner>,
    ip: IpAddr,
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Total,
    PerClient,
}

impl ConnLimiter {
    pub fn new(l: &LimitSettings) -> ConnLimiter {
        ConnLimiter {
            inner: Arc::new(LimiterInner {
                max_total: l.max_connections,
                max_per_client: l.max_connections_per_client,
                open: Mutex::new((0, HashMap::new())),
            }),
        }
    }

    /// Admit a connection from `ip`, or say which cap it would break.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnPermit, Refused> {
        let mut open = self.inner.open.lock().unwrap();
        if open.0 >= self.inner.max_total {
            return Err(Refused::Total);
        }
        let n = open.1.entry(ip).or_insert(0);
        if *n >= self.inner.max_per_client {
            return Err(Refused::PerClient);
        }
        *n += 1;
        open.0 += 1;
        Ok(ConnPermit { inner: self.inner.clone(), ip })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner.open.lock().unwrap().0
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut open = self.inner.open.lock().unwrap();
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

/// A connection whose writes fail once they have made no progress for
/// `timeout`: a client that stops reading a response (a slow pull, or one
/// that never reads) frees its connection, file and buffers instead of
/// holding them forever.
pub struct SendDeadline<T> {
    io: T,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> SendDeadline<T> {
    pub fn new(io: T, timeout: Duration) -> SendDeadline<T> {
        SendDeadline { io, timeout, stalled: None }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Ready(Err) once the write has been pending too long.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let timeout = self.timeout;
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading the response")))
    }

    fn progressed<R>(&mut self, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.stalled = None;
        }
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendDeadline<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendDeadline<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if r.is_pending() {
            return self.check(cx);
        }
        self.progressed(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if r.is_pending() {
            return self.check(cx);
        }
        self.progressed(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        if r.is_pending() {
            return self.check(cx).map_ok(|_| ());
        }
        self.progressed(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The minimum rate a request body must keep, checked over whole windows.
#[derive(Debug, Clone, Copy)]
pub struct MinRate {
    pub bytes_per_sec: u64,
    pub window: Duration,
}

impl MinRate {
    /// None when the check is off.
    pub fn from_settings(l: &LimitSettings) -> Option<MinRate> {
        (l.body_min_bytes_per_sec > 0).then(|| MinRate {
            bytes_per_sec: l.body_min_bytes_per_sec,
            window: Duration::from_secs(l.body_window_secs),
        })
    }

    fn floor(&self) -> u64 {
        self.bytes_per_sec.saturating_mul(self.window.as_secs().max(1))
    }
}

/// The error a body too slow ends with.
pub fn too_slow(rate: &MinRate) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the request body sent less than {} bytes/s over {} s and was cut; the bytes received are kept",
            rate.bytes_per_sec,
            rate.window.as_secs()
        ),
    )
}

/// A body stream that ends with an error when, over a window of time spent
/// waiting for the client, fewer bytes arrived than the minimum rate asks.
/// Only time spent waiting on the client counts: a handler that stops
/// reading for a while (its disk is busy) never gets a client cut for it.
/// The timer runs while the body is idle, so a client that sends nothing is
/// cut as well.
pub struct RateChecked<S> {
    inner: S,
    rate: Option<MinRate>,
    /// When the current wait on the client began.
    waiting_since: Option<Instant>,
    /// Time waited on the client in this window, before `waiting_since`.
    waited: Duration,
    in_window: u64,
    timer: Pin<Box<Sleep>>,
    failed: bool,
}

impl<S> RateChecked<S> {
    pub fn new(inner: S, rate: Option<MinRate>) -> RateChecked<S> {
        RateChecked {
            inner,
            rate,
            waiting_since: None,
            waited: Duration::ZERO,
            in_window: 0,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            failed: false,
        }
    }

    /// Close the window if the client has been waited on for a whole one:
    /// Err when it brought too little.
    fn close_window(&mut self, rate: &MinRate, now: Instant) -> Result<(), ()> {
        let waited = self.waited + self.waiting_since.map(|t| now - t).unwrap_or_default();
        if waited < rate.window {
            return Ok(());
        }
        if self.in_window < rate.floor() {
            return Err(());
        }
        self.in_window = 0;
        self.waited = Duration::ZERO;
        self.waiting_since = self.waiting_since.map(|_| now);
        Ok(())
    }
}

impl<S: Stream<Item = io::Result<Bytes>> + Unpin> Stream for RateChecked<S> {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut this.inner).poll_next(cx);
        let Some(rate) = this.rate else { return polled };
        let now = Instant::now();
        match &polled {
            Poll::Ready(Some(Ok(b))) => {
                this.in_window += b.len() as u64;
                if let Some(t) = this.waiting_since.take() {
                    this.waited += now - t;
                }
                if this.close_window(&rate, now).is_err() {
                    this.failed = true;
                    return Poll::Ready(Some(Err(too_slow(&rate))));
                }
                polled
            }
            Poll::Ready(_) => polled,
            Poll::Pending => {
                let since = *this.waiting_since.get_or_insert(now);
                loop {
                    let now = Instant::now();
                    if this.close_window(&rate, now).is_err() {
                        this.failed = true;
                        return Poll::Ready(Some(Err(too_slow(&rate))));
                    }
                    // Wake when this window's waiting time is up.
                    let due = this.waiting_since.unwrap_or(since) + rate.window.saturating_sub(this.waited);
                    this.timer.as_mut().reset(due);
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn limits(total: usize, per: usize) -> LimitSettings {
        LimitSettings { max_connections: total, max_connections_per_client: per, ..Default::default() }
    }

    #[test]
    fn connections_are_capped_in_total_and_per_client() {
        let l = ConnLimiter::new(&limits(3, 2));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Refused::PerClient));
        let _b1 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).err(), Some(Refused::Total));
        drop(a1);
        assert_eq!(l.open(), 2);
        let _b2 = l.admit(b).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_below_the_rate_is_cut_and_a_fast_one_is_not() {
        let rate = MinRate { bytes_per_sec: 100, window: Duration::from_secs(10) };
        // 50 bytes every second: half the rate.
        let slow = futures::stream::unfold(0, |i| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            (i < 100).then(|| (Ok(Bytes::from(vec![0u8; 50])), i + 1))
        });
        let mut checked = RateChecked::new(Box::pin(slow), Some(rate));
        let mut got = 0;
        let err = loop {
            match checked.next().await {
                Some(Ok(b)) => got += b.len(),
                Some(Err(e)) => break e,
                None => panic!("a slow body ran to its end"),
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(got < 600, "cut within the first window or so, got {got}");
        assert!(checked.next().await.is_none());

        // 200 bytes every second, for 30 s: passes every window.
        let fast = futures::stream::unfold(0, |i| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            (i < 30).then(|| (Ok(Bytes::from(vec![0u8; 200])), i + 1))
        });
        let all: Vec<_> = RateChecked::new(Box::pin(fast), Some(rate)).collect().await;
        assert_eq!(all.len(), 30);
        assert!(all.iter().all(|r| r.is_ok()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_sends_nothing_is_cut() {
        let rate = MinRate { bytes_per_sec: 1, window: Duration::from_secs(5) };
        let silent = futures::stream::pending::<io::Result<Bytes>>();
        let mut checked = RateChecked::new(silent, Some(rate));
        let r = tokio::time::timeout(Duration::from_secs(6), checked.next()).await.expect("cut in time");
        assert!(matches!(r, Some(Err(_))));
    }
}
