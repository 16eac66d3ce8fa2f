//! Serving through trouble, one scenario after another on a Redis of its own
//! (or `REDIS_URL`'s):
//!
//! - fail-safe: the origin failing for the middle half of a run, at concurrency 64;
//! - early refresh: a hot key with a 1 s TTL read at concurrency 64;
//! - write-behind: the flusher's process SIGKILLed with jobs queued and in
//!   flight, then restarted (the example runs itself as that child);
//!
//! each beside its control.
//!
//! ```text
//! cargo run --release --example trouble -- --seconds 20 --refresh-seconds 30 --jobs 10000
//! ```
//!
//! A readable table on stdout, one JSON line per figure on stderr.

#[path = "../../tests/support/mod.rs"]
mod support;

mod early_refresh;
mod fail_safe;
mod write_behind;
#[allow(dead_code)]
#[path = "../../tests/support/write_behind.rs"]
mod write_behind_crash;

fn main() {
    if write_behind_crash::child() {
        return;
    }
    let seconds = support::arg("--seconds", 20).max(4);
    let refresh_seconds = support::arg("--refresh-seconds", 30).max(2);
    let jobs = support::arg("--jobs", 10_000).max(100);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let redis = support::Redis::start();
        fail_safe::scenario(redis.url(), seconds).await;
        println!();
        early_refresh::scenario(redis.url(), refresh_seconds).await;
        println!();
        write_behind::scenario(&redis, jobs).await;
    });
}
