//! Hostile input: keys and arguments with separators, globs, NUL, unicode and
//! megabytes; values over the size limit; random bytes where entries should be.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};

use cache_runtime::__private::{
    always, get_or_compute, push_part, Attached, Call, KeyBuilder, Plain, Sharing, Spec, Tags,
};
use cache_runtime::{Cache, CacheError};
use redis::AsyncCommands;
use support::{both_modes, Redis};

const SPEC: Spec = Spec::named("echo").with_prefix("echo");

fn nasty() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        ":",
        "::",
        "a:b",
        "*",
        "?",
        "[",
        "]",
        "[a-z]",
        "\\",
        "\\*",
        "\0",
        "a\0b",
        "%",
        "%3A",
        "#",
        "~",
        "{tag}",
        " ",
        "\n",
        "ünïcødé",
        "🚀",
        "missions:*",
        "x".repeat(64).as_str(),
        "x".repeat(65).as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("m".repeat(1 << 20));
    v.push(format!("{}!", "m".repeat(1 << 20)));
    v
}

async fn echo(cache: &Cache, arg: &str, runs: &AtomicU32) -> String {
    let mut key = KeyBuilder::new(cache, &SPEC);
    key.arg(arg);
    let call = Call { cache, spec: &SPEC, key: key.finish() };
    get_or_compute::<Plain, _, _, _, _, _>(
        call,
        always,
        Sharing::none(),
        Sharing::none(),
        Attached,
        move || {
            (Tags::Static(&[]), async move {
                runs.fetch_add(1, Ordering::SeqCst);
                arg.to_owned()
            })
        },
    )
    .await
}

#[test]
fn hostile_arguments_give_distinct_bounded_glob_free_key_parts() {
    let mut seen = HashSet::new();
    for arg in nasty() {
        let mut part = String::new();
        push_part(&mut part, arg.as_str());
        assert!(part.len() <= 70, "unbounded part for a {}-byte argument", arg.len());
        assert!(!part.contains([':', '*', '?', '[', ']', '\\', '\0', '{', '}']), "{part:?}");
        assert!(seen.insert(part.clone()), "collision on {part:?}");
    }
}

#[tokio::test]
async fn hostile_arguments_round_trip_without_colliding_or_widening_patterns() {
    let redis = Redis::start();
    for cache in both_modes(&redis, "hostile").await {
        let runs = AtomicU32::new(0);
        let args = nasty();
        for arg in &args {
            assert_eq!(&echo(&cache, arg, &runs).await, arg);
        }
        for arg in &args {
            assert_eq!(
                &echo(&cache, arg, &runs).await,
                arg,
                "{:?}: wrong value for {:?}",
                cache.mode(),
                &arg[..arg.len().min(10)]
            );
        }
        assert_eq!(
            runs.load(Ordering::SeqCst) as usize,
            args.len(),
            "each argument is its own entry, hit the second time"
        );
        // A pattern built from a hostile argument deletes only that argument's entry.
        let mut part = String::new();
        push_part(&mut part, "*");
        assert_eq!(cache.delete_pattern(&format!("echo:v2:{part}")).await.unwrap(), 1);
        assert_eq!(cache.stats().await.unwrap().total_keys as usize, args.len() - 1);
    }
}

#[tokio::test]
async fn a_value_over_the_limit_is_not_stored_but_the_caller_is_served() {
    let redis = Redis::start();
    let config = redis.config("big").max_value_bytes(1024).build().unwrap();
    let cache = Cache::new(config).await.unwrap();
    let runs = AtomicU32::new(0);
    let big = "b".repeat(4096);
    for _ in 0..2 {
        assert_eq!(echo(&cache, &big, &runs).await, big);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "an oversized result must not be cached");
    let err = cache.set("direct", &big).await.unwrap_err();
    assert!(matches!(err, CacheError::TooLarge { size, limit: 1024 } if size > 4096), "{err}");
    assert_eq!(cache.stats().await.unwrap().oversized, 3);
    assert!(!cache.exists("direct").await.unwrap());
}

/// xorshift: reproducible random bytes without a dependency.
fn random_bytes(seed: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed as u8
        })
        .collect()
}

#[tokio::test]
async fn random_bytes_where_entries_should_be_read_as_misses() {
    let redis = Redis::start();
    let cache = redis.cache("fuzz", cache_runtime::Serialization::Json).await;
    let mut raw = redis.raw().await;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let runs = AtomicU32::new(0);
    for i in 0..300 {
        let mut bytes = random_bytes(&mut seed, (i * 7) % 200);
        // Half of them carry a valid header, so the payload decoders see garbage too.
        if i % 2 == 0 && bytes.len() >= 3 {
            bytes[0] = 0xCA;
            bytes[1] = cache_runtime::codec::WIRE_VERSION;
            bytes[2] = 1 + (i % 3) as u8;
        }
        let mut key = KeyBuilder::new(&cache, &SPEC);
        key.arg(&format!("f{i}"));
        let full = format!("{}:{}", cache.config().key_prefix(), key.finish().relative());
        let _: () = raw.set(&full, bytes).await.unwrap();
        assert_eq!(echo(&cache, &format!("f{i}"), &runs).await, format!("f{i}"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 300, "every planted entry was a miss");
}
