//! Unreadable entries are misses: removed, counted, never a panic or an error.

mod support;

use std::time::Duration;

use cache_runtime::Serialization;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use support::{Redis, FORMATS};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Agent {
    id: u32,
    name: String,
}

#[tokio::test]
async fn corrupt_bytes_planted_with_a_raw_set_read_as_a_miss() {
    let redis = Redis::start();
    for format in FORMATS {
        let cache = redis.cache("corrupt", format).await;
        let mut raw = redis.raw().await;
        let full = |k: &str| format!("{}:{k}", cache.config().key_prefix());
        let good = cache_runtime::Cache::local(cache.config().clone());
        good.set("x", &Agent { id: 1, name: "a".into() }).await.unwrap();
        let planted: [(&str, Vec<u8>); 5] = [
            ("plain", b"{\"id\":1,\"name\":\"a\"}".to_vec()),
            ("garbage", vec![0xCA, 1, 2, 0xFF, 0x00, 0x13]),
            ("truncated", vec![0xCA, 1]),
            ("bad-checksum", vec![0xCA, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'{', b'}']),
            ("unknown-format", vec![0xCA, 2, 9, b'{', b'}']),
        ];
        // Intact, but of another type than the reader asks for: another build's entry.
        let other_type = cache_runtime::codec::encode(format, &"hi").unwrap();
        let _: () = raw.set(full("wrong-shape"), other_type.as_slice()).await.unwrap();
        for (key, bytes) in &planted {
            let _: () = raw.set(full(key), bytes.as_slice()).await.unwrap();
        }
        for (key, _) in &planted {
            assert_eq!(cache.get::<Agent>(key).await.unwrap(), None, "{format}: {key}");
        }
        assert_eq!(cache.get::<Agent>("wrong-shape").await.unwrap(), None, "{format}");
        let stats = cache.stats().await.unwrap();
        assert_eq!(stats.decode_failures, planted.len() as u64);
        assert_eq!(stats.type_mismatches, 1);
        // The removal is off the caller's path; give it a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (key, _) in &planted {
            assert!(!cache.exists(key).await.unwrap(), "{format}: {key} left in place");
        }
        assert!(cache.exists("wrong-shape").await.unwrap(), "{format}: another type's entry is not dropped");
        assert_eq!(cache.get::<String>("wrong-shape").await.unwrap().as_deref(), Some("hi"), "{format}");
    }
}

#[tokio::test]
async fn a_reader_set_to_another_format_decodes_by_the_header() {
    let redis = Redis::start();
    let json = redis.cache("hdr", Serialization::Json).await;
    let config = cache_runtime::CacheConfig::builder()
        .redis_url(redis.url())
        .key_prefix(json.config().key_prefix())
        .serialization(Serialization::Binary)
        .build()
        .unwrap();
    let binary = cache_runtime::Cache::new(config).await.unwrap();
    json.set("a", &Agent { id: 7, name: "json".into() }).await.unwrap();
    binary.set("b", &Agent { id: 8, name: "binary".into() }).await.unwrap();
    assert_eq!(binary.get::<Agent>("a").await.unwrap().unwrap().id, 7);
    assert_eq!(json.get::<Agent>("b").await.unwrap().unwrap().id, 8);
}
