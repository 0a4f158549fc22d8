//! [`Gated`]: a future that is polled again only once it has asked to be
//! woken, for what the relay loop waits on besides its sockets.
//!
//! Every branch of a `select!` is polled each time its task runs. A session's
//! relay loop runs twice per transaction, and its kill, shutdown and cut
//! futures (tokio `Notified`s underneath) take their notifier's lock on every
//! poll, even though they fire perhaps once in the session's life: that was a
//! tenth of the router's user-space instructions on select-only. Behind a
//! gate, a poll that finds no wake-up since the last one costs one atomic
//! load.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// Polls `F` only when `F`'s own waker has fired since it was last polled
/// (and on the first poll).
pub(crate) struct Gated<F> {
    inner: Pin<Box<F>>,
    signal: Arc<Signal>,
    /// The waker `inner` is polled with: it opens the gate.
    opener: Waker,
    /// The task's waker as last handed to `signal`.
    task: Option<Waker>,
}

/// Shared between the gate and the waker it hands to the inner future.
struct Signal {
    open: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.open.store(true, Ordering::Release);
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl<F: Future> Gated<F> {
    pub(crate) fn new(inner: F) -> Gated<F> {
        let signal = Arc::new(Signal {
            // Open, so that the first poll lets the inner future register.
            open: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Gated {
            inner: Box::pin(inner),
            opener: Waker::from(signal.clone()),
            signal,
            task: None,
        }
    }

    /// Hands the task's waker to the signal (once per gate for a spawned
    /// task, whose waker does not change).
    #[cold]
    fn hand_over(&mut self, waker: &Waker) {
        let task = waker.clone();
        *self
            .signal
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task.clone());
        self.task = Some(task);
    }

    /// Shuts the gate and polls the inner future with the opener. Kept out
    /// of line so that the common case, a shut gate, stays a few
    /// instructions in the relay loop.
    #[inline(never)]
    fn poll_inner(&mut self) -> Poll<F::Output> {
        if !self.signal.open.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        self.inner
            .as_mut()
            .poll(&mut Context::from_waker(&self.opener))
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // The task's waker is handed over before the gate is looked at, so a
        // wake-up between the two reaches this task.
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            this.hand_over(cx.waker());
        }
        if !this.signal.open.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        this.poll_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::Notify;

    /// Counts its polls and is ready once `notify` has fired.
    async fn counted(notify: Arc<Notify>, polls: Arc<AtomicUsize>) {
        let notified = notify.notified();
        let mut notified = std::pin::pin!(notified);
        std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::SeqCst);
            notified.as_mut().poll(cx)
        })
        .await
    }

    fn noop_poll<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn the_inner_future_is_polled_only_after_its_own_wake_up() {
        let notify = Arc::new(Notify::new());
        let polls = Arc::new(AtomicUsize::new(0));
        let mut gated = Gated::new(counted(notify.clone(), polls.clone()));
        for _ in 0..100 {
            assert!(noop_poll(&mut gated).is_pending());
        }
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "polled behind a closed gate"
        );
        notify.notify_waiters();
        assert!(noop_poll(&mut gated).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_notification_wakes_the_task_waiting_behind_the_gate() {
        let notify = Arc::new(Notify::new());
        let polls = Arc::new(AtomicUsize::new(0));
        let gated = Gated::new(counted(notify.clone(), polls.clone()));
        let waiter = tokio::spawn(gated);
        // Let the waiter register, then fire from this task.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        notify.notify_waiters();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the gated future was never woken")
            .expect("the waiting task failed");
    }

    /// Wakes a flag, standing in for a second task's waker.
    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_new_task_waker_replaces_the_old_one() {
        let notify = Arc::new(Notify::new());
        let mut gated = Gated::new(counted(notify.clone(), Arc::new(AtomicUsize::new(0))));
        let first = Arc::new(Flag(AtomicBool::new(false)));
        let second = Arc::new(Flag(AtomicBool::new(false)));
        let first_waker = Waker::from(first.clone());
        let second_waker = Waker::from(second.clone());
        assert!(Pin::new(&mut gated)
            .poll(&mut Context::from_waker(&first_waker))
            .is_pending());
        assert!(Pin::new(&mut gated)
            .poll(&mut Context::from_waker(&second_waker))
            .is_pending());
        notify.notify_waiters();
        assert!(
            second.0.load(Ordering::SeqCst),
            "the current waker was not woken"
        );
        assert!(
            !first.0.load(Ordering::SeqCst),
            "the replaced waker was woken"
        );
    }
}
