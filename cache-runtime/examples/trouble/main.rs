//! Serving through trouble, one scenario after another on a Redis of its own
//! (or `REDIS_URL`'s):
//!
//! - fail-safe: the origin failing for the middle half of a run, at concurrency 64;
//! - early refresh: a hot key with a 1 s TTL read at concurrency 64;
//!
//! each beside its control.
//!
//! ```text
//! cargo run --release --example trouble -- --seconds 20 --refresh-seconds 30
//! ```
//!
//! A readable table on stdout, one JSON line per figure on stderr.

#[path = "../../tests/support/mod.rs"]
mod support;

mod early_refresh;
mod fail_safe;

fn main() {
    let seconds = support::arg("--seconds", 20).max(4);
    let refresh_seconds = support::arg("--refresh-seconds", 30).max(2);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let redis = support::Redis::start();
        fail_safe::scenario(redis.url(), seconds).await;
        println!();
        early_refresh::scenario(redis.url(), refresh_seconds).await;
    });
}
