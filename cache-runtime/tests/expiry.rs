//! Expiry: TTL jitter spreads the expiries of entries written together and
//! never lengthens one.

mod support;

use std::time::Duration;

use cache_runtime::{Cache, KeyTtl};
use support::{unique_prefix, Redis};

async fn spread(cache: &Cache) -> (Duration, Duration) {
    for i in 0..200u32 {
        cache.set(&format!("k:{i}"), &i).ttl(100).await.unwrap();
    }
    let mut left = Vec::new();
    for i in 0..200u32 {
        match cache.ttl(&format!("k:{i}")).await.unwrap() {
            KeyTtl::Expires(d) => left.push(d),
            other => panic!("k:{i}: {other:?}"),
        }
    }
    (*left.iter().min().unwrap(), *left.iter().max().unwrap())
}

#[tokio::test]
async fn ttl_jitter_spreads_expiries_and_never_lengthens_them() {
    let redis = Redis::start();
    for redis_mode in [true, false] {
        let build = |percent: u8| {
            let builder = cache_runtime::CacheConfig::builder().key_prefix(unique_prefix("jitter"));
            let builder = if redis_mode { builder.redis_url(redis.url()) } else { builder };
            builder.ttl_jitter_percent(percent).build().unwrap()
        };
        let jittered = Cache::new(build(20)).await.unwrap();
        let (min, max) = spread(&jittered).await;
        assert!(max <= Duration::from_secs(100), "never longer than asked: {max:?}");
        assert!(min >= Duration::from_secs(79), "at most 20% shorter: {min:?}");
        assert!(max - min >= Duration::from_secs(5), "spread out: {min:?}..{max:?}");

        // The control: without jitter, entries written together expire together.
        let plain = Cache::new(build(0)).await.unwrap();
        let (min, max) = spread(&plain).await;
        assert!(max - min <= Duration::from_secs(2), "{min:?}..{max:?}");
    }
}
