//! openraft's async runtime: tokio, except that the deadline openraft puts
//! on an RPC can be stretched by the RPC itself.
//!
//! openraft 0.9 wraps every AppendEntries in a timeout of one heartbeat
//! interval, whatever it carries. A manifest near `max_manifest_bytes`
//! travels in its entry, and several megabytes cannot always cross to a
//! follower and be fsynced there within 50-100 ms: the leader then times
//! out, sends the same entries again, and times out again for ever, and the
//! cluster takes no more writes. Here the network client says how long its
//! payload may take ([`stretch_deadline`]); the timeout around it honours
//! that once. Heartbeats and small appends keep openraft's deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend, TokioInstant};
use tokio::task::futures::TaskLocalFuture;

/// [`AsyncRuntime`] for berth's Raft: see the module documentation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BerthRuntime;

/// Extra time granted to the RPC running under a [`Timeout`].
#[derive(Clone, Default)]
struct Stretch(Arc<Mutex<Option<Duration>>>);

tokio::task_local! {
    static STRETCH: Stretch;
}

/// Let the RPC being polled (under an openraft timeout) run `extra` longer
/// than openraft's deadline. Outside such a timeout it does nothing.
pub fn stretch_deadline(extra: Duration) {
    let _ = STRETCH.try_with(|s| *s.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(extra));
}

/// The error of an expired [`Timeout`].
#[derive(Debug)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline has elapsed")
    }
}

/// A timeout whose deadline the wrapped future may push back once.
pub struct Timeout<F: Future> {
    inner: Pin<Box<TaskLocalFuture<Stretch, F>>>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    stretch: Stretch,
}

impl<F: Future> Timeout<F> {
    fn new(sleep: tokio::time::Sleep, future: F) -> Timeout<F> {
        let stretch = Stretch::default();
        Timeout { inner: Box::pin(STRETCH.scope(stretch.clone(), future)), sleep: Box::pin(sleep), stretch }
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(v) = this.inner.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        loop {
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let extra = this.stretch.0.lock().unwrap_or_else(|e| e.into_inner()).take();
            match extra {
                Some(extra) => {
                    let at = this.sleep.deadline() + extra;
                    this.sleep.as_mut().reset(at);
                }
                None => return Poll::Ready(Err(Elapsed)),
            }
        }
    }
}

impl AsyncRuntime for BerthRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = Timeout<T>;
    type ThreadLocalRng = rand::rngs::ThreadRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        Timeout::new(tokio::time::sleep(duration), future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        Timeout::new(tokio::time::sleep_until(deadline), future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        rand::thread_rng()
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Paused time: the clock moves only when every task waits.
    #[tokio::test(start_paused = true)]
    async fn a_stretched_rpc_outlives_the_deadline_and_others_do_not() {
        let slow = || tokio::time::sleep(Duration::from_millis(150));
        let plain = BerthRuntime::timeout(Duration::from_millis(30), slow()).await;
        assert!(plain.is_err());
        let stretched = BerthRuntime::timeout(Duration::from_millis(30), async {
            stretch_deadline(Duration::from_secs(5));
            slow().await
        })
        .await;
        assert!(stretched.is_ok());
        // Stretched once, by what was asked, not for ever.
        let bounded = BerthRuntime::timeout(Duration::from_millis(30), async {
            stretch_deadline(Duration::from_millis(30));
            tokio::time::sleep(Duration::from_secs(5)).await
        })
        .await;
        assert!(bounded.is_err());
    }
}
