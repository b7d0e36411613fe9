//! Spinning instead of sleeping, briefly, where a lone sequence's next event is near.
//!
//! A thread that sleeps is woken by another one through the kernel, and on the benchmark's
//! 2-core virtual machine each such wake-up costs tens of microseconds, several per request:
//! the transport wakes Python with an arrival, Python wakes the transport with the answer.
//! With one sequence served, its next event comes a few hundred microseconds later, so the
//! waiting side spins for up to `--native-spin-us` instead (as ONNX Runtime's own threads
//! spin between parallel sections), and sleeps if nothing came.

use std::time::{Duration, Instant};

/// Spin until `done()` or `limit` has passed; whether `done()` became true.
pub fn spin_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        for _ in 0..32 {
            std::hint::spin_loop();
        }
    }
}

/// Poll `ready` until it gives something or `limit` has passed, yielding to tokio between
/// polls: the task spins without holding its thread from other tasks and I/O (tokio polls its
/// I/O driver before it runs a task that yielded).
pub async fn poll_until<T>(limit: Duration, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
    let until = Instant::now() + limit;
    loop {
        if let Some(value) = ready() {
            return Some(value);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn gives_up_after_the_limit() {
        let started = Instant::now();
        assert!(!spin_until(Duration::from_micros(200), || false));
        assert!(started.elapsed() >= Duration::from_micros(200));
    }

    #[tokio::test]
    async fn a_polling_task_lets_the_others_of_its_thread_run() {
        let flag = Arc::new(AtomicBool::new(false));
        let setter = {
            let flag = flag.clone();
            tokio::spawn(async move { flag.store(true, Ordering::Release) })
        };
        // One thread (the test runtime's): the setter runs only if the poller yields.
        let seen = poll_until(Duration::from_secs(10), || {
            flag.load(Ordering::Acquire).then_some(())
        });
        assert_eq!(seen.await, Some(()));
        setter.await.unwrap();
        assert_eq!(
            poll_until(Duration::from_micros(100), || None::<()>).await,
            None
        );
    }

    #[test]
    fn sees_what_another_thread_sets() {
        let flag = Arc::new(AtomicBool::new(false));
        let setter = {
            let flag = flag.clone();
            std::thread::spawn(move || flag.store(true, Ordering::Release))
        };
        assert!(spin_until(Duration::from_secs(10), || flag.load(Ordering::Acquire)));
        setter.join().unwrap();
    }
}
