//! Encrypted entries: a sensitive prefix's entries reach Redis only
//! encrypted, open on every instance holding their key (by name, so keys
//! rotate), and anything else under that prefix (an unencrypted entry, one
//! sealed with a key no longer held, one changed in place) reads as a miss,
//! counted.

mod support;

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use cache_runtime::{cached, Cache, CacheConfig};
use redis::AsyncCommands;
use support::{unique_prefix, Redis, CURRENT};

const K1: (&str, &str) = ("k1", "first-secret-of-the-fleet");
const K2: (&str, &str) = ("k2", "second-secret-of-the-fleet");

async fn cache(redis: &Redis, prefix: &str, keys: &[(&str, &str)]) -> Cache {
    let config = CacheConfig::builder()
        .redis_url(redis.url())
        .key_prefix(prefix)
        .encryption_keys(keys.iter().copied())
        .sensitive_prefixes(["users"])
        .build()
        .unwrap();
    Cache::new(config).await.unwrap()
}

/// Every value under `prefix` in Redis, raw.
async fn raw_values(redis: &Redis, prefix: &str) -> Vec<Vec<u8>> {
    let mut raw = redis.raw().await;
    let keys: Vec<String> = raw.keys(format!("{prefix}:*")).await.unwrap();
    let mut values = Vec::new();
    for key in keys {
        values.push(raw.get(key).await.unwrap());
    }
    values
}

fn holds(bytes: &[u8], text: &str) -> bool {
    bytes.windows(text.len()).any(|w| w == text.as_bytes())
}

#[tokio::test]
async fn sensitive_entries_are_encrypted_in_redis_and_open_where_their_key_is_held() {
    let redis = Redis::start();
    let prefix = unique_prefix("sealed");
    let first = cache(&redis, &prefix, &[K1]).await;
    first.set("users:1", &"alice@example.com").await.unwrap();
    first.set("orders:1", &"order of alice@example.com").await.unwrap();
    assert_eq!(first.get::<String>("users:1").await.unwrap().as_deref(), Some("alice@example.com"));

    let values = raw_values(&redis, &prefix).await;
    assert_eq!(values.len(), 2);
    assert_eq!(
        values.iter().filter(|v| holds(v, "alice@example.com")).count(),
        1,
        "only the order in the clear"
    );
    assert!(values.iter().any(|v| holds(v, "order of alice")), "the control: a prefix not sensitive");

    // Another instance with the same key opens it; one with the key rotated
    // (k2 first) opens it too, and writes under k2.
    let same = cache(&redis, &prefix, &[K1]).await;
    assert_eq!(same.get::<String>("users:1").await.unwrap().as_deref(), Some("alice@example.com"));
    let rotated = cache(&redis, &prefix, &[K2, K1]).await;
    assert_eq!(rotated.get::<String>("users:1").await.unwrap().as_deref(), Some("alice@example.com"));
    rotated.set("users:2", &"bob@example.com").await.unwrap();
    assert_eq!(first.get::<String>("users:2").await.unwrap(), None, "k2 is unknown to the first instance");
    assert_eq!(first.stats().await.unwrap().bad_encryption, 1);
    // Once k1 is dropped, its entries are misses.
    let only_k2 = cache(&redis, &prefix, &[K2]).await;
    assert_eq!(only_k2.get::<String>("users:2").await.unwrap().as_deref(), Some("bob@example.com"));
    assert_eq!(only_k2.get::<String>("users:1").await.unwrap(), None);
    assert_eq!(only_k2.stats().await.unwrap().bad_encryption, 1);
    assert!(!format!("{:?}", first.config()).contains(K1.1), "a secret is never printed");
}

#[tokio::test]
async fn an_unencrypted_or_changed_entry_of_a_sensitive_prefix_reads_as_a_miss() {
    let redis = Redis::start();
    let prefix = unique_prefix("forged");
    let sealed = cache(&redis, &prefix, &[K1]).await;
    let plain =
        Cache::new(CacheConfig::builder().redis_url(redis.url()).key_prefix(&prefix).build().unwrap())
            .await
            .unwrap();
    // A well-formed entry from a writer that does not encrypt.
    plain.set("users:9", &"forged").await.unwrap();
    let runs = AtomicU32::new(0);
    let got = sealed
        .get_with("users:9", async {
            runs.fetch_add(1, SeqCst);
            "computed".to_owned()
        })
        .await;
    assert_eq!((got.as_str(), runs.load(SeqCst)), ("computed", 1), "the body ran instead of a decode");
    // Counted per read: the call read it again before running the body.
    let refused = sealed.stats().await.unwrap().bad_encryption;
    assert!(refused >= 1);
    // The control: a cache that does not encrypt decodes what it wrote.
    plain.set("users:10", &"theirs").await.unwrap();
    assert_eq!(plain.get::<String>("users:10").await.unwrap().as_deref(), Some("theirs"));

    // A sealed entry changed in place.
    sealed.set("users:11", &"mine").await.unwrap();
    let mut raw = redis.raw().await;
    let key = format!("{prefix}:users:11");
    let mut bytes: Vec<u8> = raw.get(&key).await.unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let _: () = raw.set(&key, bytes).await.unwrap();
    assert_eq!(sealed.get::<String>("users:11").await.unwrap(), None);
    assert_eq!(sealed.stats().await.unwrap().bad_encryption, refused + 1);
}

static RUNS: AtomicU32 = AtomicU32::new(0);

#[cached(sensitive = true, ttl = 60, cache = support::current(), prefix = "profiles")]
async fn profile(id: u32) -> String {
    RUNS.fetch_add(1, SeqCst);
    format!("profile {id}: carol@example.com")
}

// One test: the function counts its runs in a static.
#[tokio::test]
async fn a_sensitive_function_is_encrypted_and_without_keys_bypasses_the_cache() {
    let redis = Redis::start();
    let prefix = unique_prefix("sensitive_fn");
    let config = CacheConfig::builder().redis_url(redis.url()).key_prefix(&prefix);
    let sealed = Cache::new(config.clone().encryption_keys([K1]).build().unwrap()).await.unwrap();
    CURRENT
        .scope(sealed.clone(), async {
            assert_eq!(profile(1).await, "profile 1: carol@example.com");
            assert_eq!(profile(1).await, "profile 1: carol@example.com");
        })
        .await;
    assert_eq!(RUNS.load(SeqCst), 1, "the second call was a hit");
    let values = raw_values(&redis, &prefix).await;
    assert_eq!(values.len(), 1);
    assert!(!holds(&values[0], "carol@example.com"), "encrypted in Redis");

    // Without keys, nothing of it is written in the clear: the calls run the body.
    let other = unique_prefix("sensitive_fn_nokeys");
    let keyless = Cache::new(config.key_prefix(&other).build().unwrap()).await.unwrap();
    CURRENT
        .scope(keyless, async {
            profile(1).await;
            profile(1).await;
        })
        .await;
    assert_eq!(RUNS.load(SeqCst), 3, "both calls ran the body");
    assert!(raw_values(&redis, &other).await.is_empty(), "nothing written");
}

#[tokio::test]
async fn sensitive_prefixes_without_keys_are_refused_at_start() {
    let redis = Redis::start();
    let config = CacheConfig::builder().redis_url(redis.url()).sensitive_prefixes(["users"]).build().unwrap();
    let err = Cache::new(config).await.unwrap_err().to_string();
    assert!(err.contains("sensitive_prefixes") && err.contains("encryption_keys"), "{err}");
    let short =
        CacheConfig::builder().redis_url(redis.url()).encryption_keys([("k", "short")]).build().unwrap();
    let err = Cache::new(short).await.unwrap_err().to_string();
    assert!(err.contains("encryption_keys") && !err.contains("short"), "{err}");
}
