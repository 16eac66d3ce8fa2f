//! Write-behind through a crash: a child process queues 10,000 jobs over 100
//! keys with `Cache::write_behind` and flushes them into a "database" (hashes
//! in Redis); it is SIGKILLed with jobs queued and in flight, and another
//! child takes over as the flusher. Beside it, the controls: the jobs queued
//! in the process's memory (the design document's `task_queue`), and a
//! handler that ignores the idempotency key.

use crate::support::Redis;
use crate::write_behind_crash::{crash, Figures, Queue, Run};

/// Runs the crash and its controls on `redis`, printing the table and figures.
pub async fn scenario(redis: &Redis, jobs: u64) {
    println!(
        "write-behind: {jobs} jobs over 100 keys, the flusher's process SIGKILLed mid-queue, then restarted"
    );
    println!(
        "{:<24} {:>7} {:>6} {:>12} {:>14} {:>13} {:>10} {:>10}",
        "queue", "jobs", "lost", "applied 2x+", "delivered 2x+", "out of order", "queued@kill", "in flight"
    );
    let runs = [
        (
            "durable",
            "write_behind_crash",
            Run { jobs, keys: 100, queue: Queue::Durable, idempotent: true, kill_after: jobs / 5 },
        ),
        (
            "control: in memory",
            "write_behind_crash_control_memory",
            Run { jobs, keys: 100, queue: Queue::Memory, idempotent: true, kill_after: jobs / 10 },
        ),
        (
            "control: key ignored",
            "write_behind_crash_control_not_idempotent",
            Run { jobs, keys: 100, queue: Queue::Durable, idempotent: false, kill_after: jobs / 5 },
        ),
    ];
    for (name, figure, run) in runs {
        let f: Figures = crash(redis, run).await;
        println!(
            "{name:<24} {:>7} {:>6} {:>12} {:>14} {:>13} {:>10} {:>10}",
            f.jobs,
            f.lost,
            f.applied_more_than_once,
            f.delivered_more_than_once,
            f.out_of_order,
            f.queued_at_kill,
            f.in_flight_at_kill
        );
        let mut line = serde_json::to_value(&f).unwrap();
        line["figure"] = figure.into();
        eprintln!("{line}");
    }
}
