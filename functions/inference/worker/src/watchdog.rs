//! The worker's watchdog: when the engine last made progress (a phase of a render, a denoising
//! step), and whether it has gone quiet for too long.
//!
//! A render runs on the engine's own thread and cannot be interrupted: a CUDA call that never
//! returns would hold its job for ever while the consumer loop kept renewing it. The engine
//! beats the watchdog at every phase and step; when a render has made no progress for
//! `DARKROOM_WATCHDOG_SECS`, the watchdog trips for good. The handler then reports itself
//! stalled (the loop stops renewing the job, hands it back and stops pulling), `/readyz` turns
//! 503 and the process exits, so its supervisor restarts it and the job renders elsewhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

// tokio's clock: the real one in production, a paused one in the tests.
use tokio::time::Instant;

/// Progress of the engine, shared between its thread and the service.
#[derive(Debug, Clone)]
pub struct Watchdog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last beat.
    last_beat_ms: AtomicU64,
    /// Whether a render is under way (an idle engine makes no progress and needs none).
    busy: AtomicBool,
    /// Set once, when the watchdog trips.
    tripped: AtomicBool,
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                last_beat_ms: AtomicU64::new(0),
                busy: AtomicBool::new(false),
                tripped: AtomicBool::new(false),
            }),
        }
    }
}

impl Watchdog {
    /// Records progress now.
    pub fn beat(&self) {
        let now = u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner.last_beat_ms.store(now, Ordering::Relaxed);
    }

    /// Marks a render as under way until the returned guard is dropped.
    pub fn rendering(&self) -> Rendering<'_> {
        self.beat();
        self.inner.busy.store(true, Ordering::Relaxed);
        Rendering(self)
    }

    /// How long the render under way has gone without progress; `None` when idle.
    pub fn silent_for(&self) -> Option<Duration> {
        if !self.inner.busy.load(Ordering::Relaxed) {
            return None;
        }
        let last = Duration::from_millis(self.inner.last_beat_ms.load(Ordering::Relaxed));
        Some(self.inner.epoch.elapsed().saturating_sub(last))
    }

    /// Whether the watchdog has tripped (it never resets: the process is to exit).
    pub fn tripped(&self) -> bool {
        self.inner.tripped.load(Ordering::Relaxed)
    }

    /// Waits until a render has gone `limit` without progress, then trips and returns how
    /// long it was silent. Checks ten times per `limit`.
    pub async fn wait_for_stall(&self, limit: Duration) -> Duration {
        let every = (limit / 10).clamp(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            tokio::time::sleep(every).await;
            if let Some(silent) = self.silent_for()
                && silent >= limit
            {
                self.inner.tripped.store(true, Ordering::Relaxed);
                return silent;
            }
        }
    }
}

/// A render under way: [`Watchdog::rendering`]'s guard.
#[derive(Debug)]
pub struct Rendering<'a>(&'a Watchdog);

impl Drop for Rendering<'_> {
    fn drop(&mut self) {
        self.0.inner.busy.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_engine_is_never_silent() {
        let watchdog = Watchdog::default();
        assert_eq!(watchdog.silent_for(), None);
        {
            let _rendering = watchdog.rendering();
            assert!(watchdog.silent_for().is_some());
        }
        assert_eq!(watchdog.silent_for(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_render_without_beats_trips_it_and_beats_keep_it_quiet() {
        let watchdog = Watchdog::default();
        let limit = Duration::from_secs(10);
        let _rendering = watchdog.rendering();
        // Beats every second keep it from tripping; paused time advances only as we sleep.
        let beating = {
            let watchdog = watchdog.clone();
            tokio::spawn(async move {
                for _ in 0..30 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    watchdog.beat();
                }
            })
        };
        let stall = tokio::spawn({
            let watchdog = watchdog.clone();
            async move { watchdog.wait_for_stall(limit).await }
        });
        beating.await.ok();
        assert!(!watchdog.tripped());
        assert!(!stall.is_finished());
        let silent = stall.await.unwrap_or_default();
        assert!(silent >= limit, "{silent:?}");
        assert!(watchdog.tripped());
    }
}
