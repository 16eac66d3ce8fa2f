//! Signed entries: with `signing_key`, what anyone without the secret writes
//! to Redis reads as a miss (counted), never as a value; so does an entry
//! moved to another key or a big value's body changed in place.

mod support;

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use cache_runtime::{Cache, CacheConfig};
use redis::AsyncCommands;
use support::{unique_prefix, Redis};

async fn caches(redis: &Redis, name: &str) -> (Cache, Cache) {
    let prefix = unique_prefix(name);
    let config = |secret: Option<&str>| {
        let builder = CacheConfig::builder().redis_url(redis.url()).key_prefix(prefix.clone());
        match secret {
            Some(secret) => builder.signing_key(secret).build().unwrap(),
            None => builder.build().unwrap(),
        }
    };
    (Cache::new(config(Some("k3y-of-the-fleet"))).await.unwrap(), Cache::new(config(None)).await.unwrap())
}

#[tokio::test]
async fn an_entry_written_without_the_secret_reads_as_a_miss() {
    let redis = Redis::start();
    let (signed, unsigned) = caches(&redis, "signed").await;
    signed.set("ok", &"mine").await.unwrap();
    assert_eq!(signed.get::<String>("ok").await.unwrap().as_deref(), Some("mine"));

    // A well-formed entry from a writer without the secret.
    unsigned.set("forged", &"theirs").await.unwrap();
    assert_eq!(signed.get::<String>("forged").await.unwrap(), None);
    let runs = AtomicU32::new(0);
    let got = signed
        .get_with("forged", async {
            runs.fetch_add(1, SeqCst);
            "computed".to_owned()
        })
        .await;
    assert_eq!((got.as_str(), runs.load(SeqCst)), ("computed", 1), "the body ran instead of a decode");
    assert!(signed.stats().await.unwrap().bad_signatures >= 2);
    // The control: without a secret the same entry is decoded.
    unsigned.set("forged2", &"theirs").await.unwrap();
    assert_eq!(unsigned.get::<String>("forged2").await.unwrap().as_deref(), Some("theirs"));

    // A valid entry copied under another key.
    let mut raw = redis.raw().await;
    let prefix = signed.config().key_prefix().to_owned();
    let bytes: Vec<u8> = raw.get(format!("{prefix}:ok")).await.unwrap();
    let _: () = raw.set(format!("{prefix}:moved"), bytes).await.unwrap();
    assert_eq!(signed.get::<String>("moved").await.unwrap(), None);
    assert_eq!(signed.get::<String>("ok").await.unwrap().as_deref(), Some("mine"));
}

#[tokio::test]
async fn a_big_value_body_changed_in_place_reads_as_a_miss() {
    let redis = Redis::start();
    let (signed, _) = caches(&redis, "signed_big").await;
    let big = "x".repeat(400 << 10);
    signed.set("big", &big).await.unwrap();
    assert_eq!(signed.get::<String>("big").await.unwrap().as_deref(), Some(big.as_str()));
    let mut raw = redis.raw().await;
    let prefix = signed.config().key_prefix().to_owned();
    let body_key = format!("{prefix}#body:big");
    let mut body: Vec<u8> = raw.get(&body_key).await.unwrap();
    let middle = body.len() / 2;
    body[middle] ^= 1;
    let _: () = raw.set(&body_key, body).await.unwrap();
    assert_eq!(signed.get::<String>("big").await.unwrap(), None);
    assert_eq!(signed.stats().await.unwrap().bad_signatures, 1);
    assert!(!format!("{:?}", signed.config()).contains("k3y-of-the-fleet"), "the secret is never printed");
}

#[tokio::test]
async fn a_short_signing_key_is_refused_at_start() {
    let redis = Redis::start();
    let config = CacheConfig::builder().redis_url(redis.url()).signing_key("short").build().unwrap();
    let err = Cache::new(config).await.unwrap_err();
    assert!(err.to_string().contains("signing_key") && !err.to_string().contains("short"), "{err}");
}
