//! Single flight: tasks that need the same environment at the same time share one build.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

type Flight<T> = Arc<OnceCell<Result<T, String>>>;

/// The builds under way, by key.
pub(crate) struct SingleFlight<T> {
    flights: Mutex<HashMap<String, Flight<T>>>,
}

impl<T> Default for SingleFlight<T> {
    fn default() -> Self {
        SingleFlight { flights: Mutex::new(HashMap::new()) }
    }
}

impl<T: Clone> SingleFlight<T> {
    /// Runs `work` for `key`, or, when a run for `key` is under way, waits for its result
    /// instead. Returns the result and whether this call ran the work. A finished run is
    /// forgotten: later callers find its result where it was put (or, after a failure, try
    /// again), so a failed build is never cached.
    pub(crate) async fn run<Fut>(&self, key: &str, work: impl FnOnce() -> Fut) -> (Result<T, String>, bool)
    where
        Fut: Future<Output = Result<T, String>>,
    {
        let flight: Flight<T> = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            flights.entry(key.to_string()).or_default().clone()
        };
        let mut ran_here = false;
        let result = flight
            .get_or_init(|| {
                ran_here = true;
                work()
            })
            .await
            .clone();
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(key);
        }
        (result, ran_here)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_a_failure_is_not_kept() {
        let flights = SingleFlight::<u32>::default();
        let runs = std::sync::atomic::AtomicU32::new(0);
        let work = || async {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok(7)
        };
        let (a, b) = tokio::join!(flights.run("k", work), flights.run("k", work));
        assert_eq!((a.0, b.0), (Ok(7), Ok(7)));
        assert!(a.1 ^ b.1, "exactly one caller ran the work");
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        let (r, ran) = flights.run("k", || async { Err("broken".to_string()) }).await;
        assert_eq!((r, ran), (Err("broken".to_string()), true));
        let (r, ran) = flights.run("k", || async { Ok(8) }).await;
        assert_eq!((r, ran), (Ok(8), true), "the failure was not remembered");
    }
}
