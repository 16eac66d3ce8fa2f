//! What the load examples share: a closed-loop driver and the median of rounds.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Runs `ops` calls of `op` over `concurrency` tasks; returns ops/s and latencies.
pub async fn drive<F, Fut>(concurrency: usize, ops: u64, op: F) -> (f64, Histogram<u64>)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let per_task = ops / concurrency as u64;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
                for i in 0..per_task {
                    let n = (t as u64).wrapping_mul(7919).wrapping_add(i);
                    let begun = Instant::now();
                    op(n).await;
                    hist.saturating_record(begun.elapsed().as_nanos() as u64);
                }
                hist
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    for t in tasks {
        hist.add(t.await.unwrap()).unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    ((per_task * concurrency as u64) as f64 / secs, hist)
}

/// The median of per-round figures (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// ~207 bytes as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mission {
    pub id: u64,
    pub name: String,
    status: String,
    priority: u8,
    crew: Vec<String>,
    progress: f64,
    tags: Vec<String>,
}

pub fn mission(id: u64) -> Mission {
    Mission {
        id,
        name: format!("Survey of the outer belt, leg {id:06}"),
        status: "active".into(),
        priority: 3,
        crew: vec!["ada.lovelace".into(), "grace.hopper".into(), "linus.torvalds".into()],
        progress: 0.4242,
        tags: vec!["missions".into(), "queue".into(), "high-priority".into()],
    }
}
