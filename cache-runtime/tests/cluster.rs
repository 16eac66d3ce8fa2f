//! Redis Cluster: every operation keeps its guarantees on a real 3-master,
//! 3-replica cluster, with entries spread over shards on every master.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cache_runtime::{Cache, Mode};
use support::cluster::Cluster;
use support::cluster_load::{run_through, Fault};
use support::eventually;

/// Masters whose keyspace holds at least one key under `prefix`.
fn masters_holding(cluster: &Cluster, prefix: &str) -> usize {
    cluster
        .topology()
        .iter()
        .filter(|n| n.master)
        .filter(|n| {
            let keys = support::cluster::cli(n.port, &["--scan", "--pattern", &format!("{prefix}:*")]);
            keys.lines().any(|l| !l.trim().is_empty())
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_works_across_masters() {
    let cluster = Cluster::start();
    let cache = cluster.cache("ops").await;
    let prefix = cache.config().key_prefix().to_owned();

    // Reads and writes, spread over the shards and so over the masters.
    for i in 0..200u32 {
        let tags = if i % 2 == 0 { ["even"] } else { ["odd"] };
        cache.set(&format!("user:{i}"), &i).ttl(300).tags(tags).await.unwrap();
    }
    for i in 0..50u32 {
        cache.set(&format!("order:{i}"), &i).await.unwrap();
    }
    assert_eq!(cache.get::<u32>("user:7").await.unwrap(), Some(7));
    assert!(cache.exists("order:3").await.unwrap());
    assert!(matches!(cache.ttl("user:7").await.unwrap(), cache_runtime::KeyTtl::Expires(_)));
    if cluster.seeds().len() >= 3 {
        assert!(masters_holding(&cluster, &prefix) >= 2, "entries all landed on one master");
    }

    // The key listing and the stats see every master.
    let mut listed = Vec::new();
    let mut cursor = 0;
    loop {
        let (keys, next) = cache.scan_keys("*", cursor, 100).await.unwrap();
        listed.extend(keys);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    listed.sort();
    listed.dedup();
    assert_eq!(listed.len(), 250, "{listed:?}");
    assert!(listed.contains(&"user:199".to_owned()) && listed.contains(&"order:0".to_owned()));
    let stats = cache.stats().await.unwrap();
    assert_eq!(stats.total_keys, 250);
    assert!(stats.used_memory_bytes.unwrap() > 0 && stats.redis_version.is_some());
    let health = cache.health().await;
    assert_eq!((health.status, health.connected, health.mode), ("healthy", true, Mode::Redis));

    // A tag reaches its entries in every shard, and nothing else.
    assert_eq!(cache.invalidate_tags(["even"]).await.unwrap(), 100);
    assert_eq!(cache.get::<u32>("user:8").await.unwrap(), None);
    assert_eq!(cache.get::<u32>("user:9").await.unwrap(), Some(9));
    assert_eq!(cache.get::<u32>("order:8").await.unwrap(), Some(8));

    // A pattern too.
    assert_eq!(cache.delete_pattern("order:*").await.unwrap(), 50);
    assert!(!cache.exists("order:1").await.unwrap());
    assert_eq!(cache.get::<u32>("user:9").await.unwrap(), Some(9));

    // One key.
    assert!(cache.delete("user:9").await.unwrap());
    assert!(!cache.delete("user:9").await.unwrap());

    // Everything: entries and the cache's own keys.
    assert_eq!(cache.clear().await.unwrap(), 99);
    assert_eq!(cache.stats().await.unwrap().total_keys, 0);
    assert_eq!(masters_holding(&cluster, &prefix), 0);
    let internal: usize = cluster
        .topology()
        .iter()
        .filter(|n| n.master)
        .map(|n| {
            let keys = support::cluster::cli(n.port, &["--scan", "--pattern", &format!("{prefix}#*tag*")]);
            keys.lines().filter(|l| !l.trim().is_empty()).count()
        })
        .sum();
    assert_eq!(internal, 0, "tag indexes left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_keys_run_their_body_once_and_fills_are_fenced() {
    let cluster = Cluster::start();
    let cache = cluster.cache("flight").await;

    // 50 callers of each of 20 cold keys: one body run per key.
    let runs = Arc::new(AtomicUsize::new(0));
    let mut calls = tokio::task::JoinSet::new();
    for caller in 0..50 {
        for key in 0..20u32 {
            let (cache, runs) = (cache.clone(), runs.clone());
            calls.spawn(async move {
                let v: u32 = cache
                    .get_with(&format!("cold:{key}"), async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        key
                    })
                    .await;
                assert_eq!(v, key, "caller {caller}");
            });
        }
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    let stats = cache.stats().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 20, "cache faults: {}", stats.errors);

    // A fill whose read came before an invalidation of its key is refused, on
    // whichever shard the key lives; the same fill without one is stored (control).
    for (i, invalidate) in [(0, true), (1, false), (2, true), (3, false)] {
        let key = format!("fenced:{i}");
        let (gate, reading) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
        let slow = {
            let (cache, gate, reading, key) = (cache.clone(), gate.clone(), reading.clone(), key.clone());
            tokio::spawn(async move {
                cache
                    .get_with(&key, async move {
                        // The body runs after the miss's read: the invalidation comes after it.
                        reading.notify_one();
                        gate.notified().await;
                        "old".to_owned()
                    })
                    .tags(["fenced"])
                    .await
            })
        };
        reading.notified().await;
        if invalidate {
            cache.delete(&key).await.unwrap();
        }
        gate.notify_one();
        assert_eq!(slow.await.unwrap(), "old");
        let stored = cache.get::<String>(&key).await.unwrap();
        if invalidate {
            assert_eq!(stored, None, "{key}: a fill that read before the invalidation landed");
        } else {
            assert_eq!(stored.as_deref(), Some("old"), "{key}: the control fill was not stored");
        }
    }
    // A tag invalidation fences too, in every shard.
    let (gate, reading) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    let slow = {
        let (cache, gate, reading) = (cache.clone(), gate.clone(), reading.clone());
        tokio::spawn(async move {
            cache
                .get_with("tagged:late", async move {
                    reading.notify_one();
                    gate.notified().await;
                    1u8
                })
                .tags(["late"])
                .await
        })
    };
    reading.notified().await;
    cache.invalidate_tags(["late"]).await.unwrap();
    gate.notify_one();
    slow.await.unwrap();
    assert_eq!(cache.get::<u8>("tagged:late").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_see_each_others_invalidations() {
    let cluster = Cluster::start();
    let a = cluster.cache("pair").await;
    let config = cluster.config("unused").key_prefix(a.config().key_prefix()).build().unwrap();
    let b = Cache::new(config).await.unwrap();
    for i in 0..40u32 {
        a.set(&format!("k:{i}"), &i).tags(["all"]).await.unwrap();
    }
    assert_eq!(b.get::<u32>("k:5").await.unwrap(), Some(5));
    assert_eq!(b.invalidate_tags(["all"]).await.unwrap(), 40);
    for i in 0..40u32 {
        assert_eq!(a.get::<u32>(&format!("k:{i}")).await.unwrap(), None);
    }
}

fn report(what: &str, f: &support::cluster_load::Figures) {
    eprintln!("{what}: {f:?}");
    assert!(f.calls > 1000 && f.invalidations > 100, "{what}: too little load to show anything: {f:?}");
    assert_eq!(f.caller_errors, 0, "{what}: {f:?}");
    assert_eq!(f.invalidations_failed, 0, "{what}: {f:?}");
    assert_eq!(f.stale_reads + f.stale_reads_local, 0, "{what}: {f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_failover_under_load_loses_nothing() {
    let figures =
        run_through(Fault::Failover, "failover", true, Duration::from_secs(6), Duration::from_secs(2)).await;
    report("manual failover", &figures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migration_under_load_loses_nothing() {
    let figures =
        run_through(Fault::Migration, "migrate", true, Duration::from_secs(6), Duration::from_secs(2)).await;
    report("slot migration", &figures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_without_stale_reads() {
    let figures =
        run_through(Fault::KillMaster, "kill", true, Duration::from_secs(12), Duration::from_secs(2)).await;
    report("killed master", &figures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_sees_stale_reads_when_nothing_is_invalidated() {
    // The control: the same load and checks, writers skipping the invalidation.
    let figures =
        run_through(Fault::None, "control", false, Duration::from_secs(3), Duration::from_secs(1)).await;
    eprintln!("control: {figures:?}");
    assert!(figures.stale_reads > 0, "the run can't see a stale read: {figures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_serves_stale_values_only_with_local_fallback_on() {
    // One master dies: both instances of the first pair open their breakers and
    // keep them open; a third instance, on Redis again after the failover,
    // updates and invalidates. With `local_fallback` on, the first instance
    // serves its local copy (stale); off (the cluster's default), it runs the
    // function (fresh).
    let mut cluster = Cluster::spawn(3, 1);
    let prefix = support::unique_prefix("fallback");
    let config = |fallback: bool, breaker: Duration| {
        cluster
            .config("fallback")
            .key_prefix(prefix.clone())
            .local_fallback(fallback)
            .circuit_breaker_threshold(1)
            .circuit_breaker_timeout(breaker)
            .health_check_interval(breaker)
            .operation_timeout(Duration::from_millis(100))
            .build()
            .unwrap()
    };
    let (on, off) = (config(true, Duration::from_secs(60)), config(false, Duration::from_secs(60)));
    let writer_config = config(false, Duration::from_millis(200));
    let on = Cache::new(on).await.unwrap();
    let off = Cache::new(off).await.unwrap();
    let source = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let read = |cache: &Cache, key: &str| {
        let (cache, key, source) = (cache.clone(), key.to_owned(), source.clone());
        async move { cache.get_with(&key, async move { source.load(Ordering::SeqCst) }).await }
    };
    // A key on the master about to die: written through the writer's settings,
    // found on that master, named without the prefix and the shard tag.
    let master = cluster.master_of(0);
    let seeding = Cache::new(writer_config.clone()).await.unwrap();
    for i in 0..100u32 {
        seeding.set(&format!("k:{i}"), &0u64).await.unwrap();
    }
    let listed = support::cluster::cli(master.port, &["--scan", "--pattern", &format!("{prefix}:*")]);
    let full = listed.lines().map(str::trim).find(|l| !l.is_empty()).expect("a key on the master").to_owned();
    let key = full[prefix.len() + 1 + 6..].to_owned();
    seeding.clear().await.unwrap();
    drop(seeding);
    let replica = cluster.replica_of(&master);
    cluster.kill(master.port);
    // Each instance's first call faults and opens its breaker (threshold 1);
    // the next fills its local tier, if it may.
    for cache in [&on, &off] {
        read(cache, &key).await;
        assert_eq!(cache.breaker_state(), cache_runtime::BreakerState::Open);
        assert_eq!(read(cache, &key).await, 1);
    }
    cluster.wait_for_master(&replica);
    // Another instance, on Redis: the update and its invalidation, which returns Ok.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let writer = loop {
        let writer = Cache::new(writer_config.clone()).await.unwrap();
        if writer.mode() == Mode::Redis {
            break writer;
        }
        assert!(std::time::Instant::now() < deadline, "no instance reached the cluster after the failover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    source.store(2, Ordering::SeqCst);
    while writer.delete(&key).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the invalidation never returned Ok");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(on.breaker_state(), cache_runtime::BreakerState::Open);
    assert_eq!(read(&on, &key).await, 1, "local_fallback on: the local copy, stale");
    assert_eq!(read(&off, &key).await, 2, "local_fallback off: the function's fresh value");
}

/// The README's least-privilege ACL for `prefix`, on a cluster.
const ACL: &str = "+ping +info +get +set +exists +pttl +unlink +scan +evalsha +script|load +time +getrange +del +hget +hmget \
                   +hexists +hset +hincrby +hdel +hscan +zadd +zrange +zrem +zcard +zremrangebyscore +pexpire \
                   +rename +publish +subscribe +cluster|slots +cluster|nodes +wait";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_user_runs_everything_and_a_missing_command_is_named() {
    let cluster = Cluster::spawn(3, 1);
    let prefix = support::unique_prefix("acl");
    let patterns = [format!("~{prefix}:*"), format!("~{prefix}#*"), format!("&{prefix}#*")];
    for node in cluster.topology() {
        for (user, commands) in [("app", ACL.to_owned()), ("nowait", ACL.replace(" +wait", ""))] {
            let mut args = vec![
                "ACL",
                "SETUSER",
                user,
                "on",
                ">pw",
                patterns[0].as_str(),
                patterns[1].as_str(),
                patterns[2].as_str(),
            ];
            args.extend(commands.split_whitespace());
            let reply = support::cluster::cli(node.port, &args);
            assert_eq!(reply.trim(), "OK", "ACL SETUSER on {}", node.port);
        }
    }
    let as_user = |user: &str| {
        let nodes: Vec<String> = cluster.seeds().iter().map(|s| format!("redis://{user}:pw@{s}")).collect();
        cache_runtime::CacheConfig::builder().redis_cluster(nodes).key_prefix(prefix.clone()).build().unwrap()
    };
    let cache = Cache::new(as_user("app")).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
    for i in 0..100u32 {
        cache.set(&format!("k:{i}"), &i).tags(["t"]).await.unwrap();
    }
    let read: String = cache.get_with("fill", async { "body".to_owned() }).tags(["t"]).await;
    assert_eq!(read, "body");
    assert_eq!(cache.get::<String>("fill").await.unwrap().as_deref(), Some("body"));
    assert_eq!(cache.invalidate_tags(["t"]).await.unwrap(), 101);
    cache.set("p:1", &1).await.unwrap();
    assert_eq!(cache.delete_pattern("p:*").await.unwrap(), 1);
    cache.set("z", &1).await.unwrap();
    assert_eq!(cache.clear().await.unwrap(), 1);
    assert_eq!(cache.stats().await.unwrap().total_keys, 0);
    assert_eq!(cache.health().await.status, "healthy");

    // The same user without WAIT is refused at start, naming the command.
    match Cache::new(as_user("nowait")).await {
        Err(cache_runtime::CacheError::Permission { action, .. }) => {
            assert!(action.to_lowercase().contains("wait"), "{action}")
        }
        other => panic!("expected a permission error naming WAIT, got {:?}", other.map(|c| c.mode())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_added_after_start_is_scanned_and_cleared() {
    let mut cluster = Cluster::spawn(3, 0);
    let cache = cluster.cache("grown").await;
    for i in 0..300u32 {
        cache.set(&format!("k:{i}"), &i).tags(["all"]).await.unwrap();
    }
    // A fourth master takes a third of the shards, keys and all.
    let new = cluster.add_master();
    for slot in (0..16384).step_by(512 * 3) {
        cluster.migrate(slot, &new);
    }
    let on_new = support::cluster::cli(new.port, &["DBSIZE"]);
    assert!(on_new.trim().parse::<u64>().unwrap() > 0, "nothing moved to the new master");
    let mut listed = 0;
    let mut cursor = 0;
    loop {
        let (keys, next) = cache.scan_keys("k:*", cursor, 50).await.unwrap();
        listed += keys.len();
        if next == 0 {
            break;
        }
        cursor = next;
    }
    assert_eq!(listed, 300);
    assert_eq!(cache.stats().await.unwrap().total_keys, 300);
    // Every key still reads, wherever it moved; a tag and a clear reach them all.
    for i in (0..300u32).step_by(7) {
        assert_eq!(cache.get::<u32>(&format!("k:{i}")).await.unwrap(), Some(i));
    }
    assert_eq!(cache.invalidate_tags(["all"]).await.unwrap(), 300);
    for i in 0..50u32 {
        cache.set(&format!("again:{i}"), &i).await.unwrap();
    }
    assert_eq!(cache.clear().await.unwrap(), 50);
    let pattern = format!("{}:*", cache.config().key_prefix());
    let left = support::cluster::cli(new.port, &["--scan", "--pattern", &pattern]);
    assert!(left.trim().is_empty(), "entries left on the new master: {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_would_split_a_script_across_slots_are_refused() {
    let cluster = Cluster::start();
    let refused = |config: cache_runtime::CacheConfig| async move {
        match Cache::new(config).await {
            Err(cache_runtime::CacheError::Config { key, .. }) => key,
            other => panic!("expected a config error, got {:?}", other.map(|c| c.mode())),
        }
    };
    // One shard would mean no hash tag; a brace in the prefix, a tag of its own.
    assert_eq!(refused(cluster.config("one").cluster_shards(1).build().unwrap()).await, "cluster_shards");
    assert_eq!(refused(cluster.config("x").key_prefix("a{b}").build().unwrap()).await, "key_prefix");
    // Instances sharing a prefix must agree on the shards: the second is refused.
    let first = cluster.config("agree").cluster_shards(16).build().unwrap();
    let prefix = first.key_prefix().to_owned();
    let cache = Cache::new(first).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
    let other = cluster.config("agree").key_prefix(prefix.clone()).cluster_shards(32).build().unwrap();
    assert_eq!(refused(other).await, "cluster_shards");
    // The control: the same count is welcome.
    let same = cluster.config("agree").key_prefix(prefix).cluster_shards(16).build().unwrap();
    assert_eq!(Cache::new(same).await.unwrap().mode(), Mode::Redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_works_and_a_wrong_ca_gets_nowhere() {
    let (cluster, certs) = Cluster::spawn_tls(3);
    let config = cluster.config("tls").tls_ca_cert(certs.ca_pem()).build().unwrap();
    let cache = Cache::new(config).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
    for i in 0..60u32 {
        cache.set(&format!("k:{i}"), &i).tags(["t"]).await.unwrap();
    }
    assert_eq!(cache.get::<u32>("k:7").await.unwrap(), Some(7));
    assert_eq!(cache.stats().await.unwrap().total_keys, 60);
    assert_eq!(cache.invalidate_tags(["t"]).await.unwrap(), 60);
    assert_eq!(cache.get::<u32>("k:7").await.unwrap(), None);

    // The control: the same cluster, trusting another CA, reaches no node.
    let wrong = cluster.config("tls-wrong").tls_ca_cert(certs.other_ca_pem()).build().unwrap();
    match Cache::new(wrong).await {
        Ok(cache) => assert_eq!(cache.mode(), Mode::Local, "a wrong CA reached Redis"),
        Err(e) => assert!(e.is_misconfiguration(), "{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tiers_the_fleet_lease_and_events_work_on_a_cluster() {
    let cluster = Cluster::start();
    let prefix = support::unique_prefix("near");
    let mut caches = Vec::new();
    for _ in 0..3 {
        let config = cluster.config("near").key_prefix(prefix.clone()).near_cache(true).build().unwrap();
        let cache = Cache::new(config).await.unwrap();
        eventually("the bus listener subscribes", || async { cache.stats().await.unwrap().bus_listening })
            .await;
        caches.push(cache);
    }
    let runs = Arc::new(AtomicUsize::new(0));
    let read = |cache: &Cache, key: &str, value: usize| {
        let (cache, key, runs) = (cache.clone(), key.to_owned(), runs.clone());
        async move {
            cache
                .get_with(&key, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    value
                })
                .tags(["t"])
                .await
        }
    };

    // Near hits, and invalidations of every kind from another instance, on keys in every shard.
    for i in 0..20 {
        let key = format!("k:{i}");
        assert_eq!(read(&caches[1], &key, 1).await, 1);
    }
    let hits = caches[1].stats().await.unwrap().near_cache_hits;
    assert_eq!(read(&caches[1], "k:3", 2).await, 1);
    assert_eq!(caches[1].stats().await.unwrap().near_cache_hits, hits + 1, "a near hit");
    caches[0].invalidate_tags(["t"]).await.unwrap();
    for i in 0..20 {
        let key = format!("k:{i}");
        eventually("the tag invalidation is heard", || async { read(&caches[1], &key, 2).await != 1 }).await;
    }
    caches[2].delete_pattern("k:1*").await.unwrap();
    eventually("the pattern is heard", || async { read(&caches[1], "k:12", 3).await != 2 }).await;

    // One body run for a cold key across the instances.
    runs.store(0, Ordering::SeqCst);
    let mut calls = Vec::new();
    for cache in &caches {
        for _ in 0..30 {
            let cache = cache.clone();
            let runs = runs.clone();
            calls.push(tokio::spawn(async move {
                cache
                    .get_with("cold", async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        9usize
                    })
                    .await
            }));
        }
    }
    for call in calls {
        assert_eq!(call.await.unwrap(), 9);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Events reach every instance.
    let heard = Arc::new(AtomicUsize::new(0));
    for cache in &caches {
        let heard = heard.clone();
        cache.on_event("updated", move |_| {
            let heard = heard.clone();
            async move {
                heard.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    caches[0].emit("updated", ()).await.unwrap();
    eventually("every handler ran", || async { heard.load(Ordering::SeqCst) == 3 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_queues_and_flushes_on_a_cluster() {
    let cluster = Cluster::start();
    // A prefix whose queue lives on another master than the first seed's: the
    // flusher's reads, opened on that seed, must follow the MOVED to it.
    let seed: u16 = cluster.seeds()[0].rsplit(':').next().unwrap().parse().unwrap();
    let prefix = std::iter::repeat_with(|| support::unique_prefix("wb"))
        .find(|prefix| {
            let slot = support::cluster::cli(seed, &["CLUSTER", "KEYSLOT", &format!("{{{prefix}}}")]);
            cluster.master_of(slot.trim().parse().unwrap()).port != seed
        })
        .unwrap();
    let cache = Cache::new(cluster.config("unused").key_prefix(&prefix).build().unwrap()).await.unwrap();
    for seq in 1..=10u32 {
        for key in ["a", "b", "c"] {
            assert!(cache.write_behind(key, &seq, &seq).await.unwrap().is_done());
        }
    }
    assert_eq!(cache.stats().await.unwrap().write_behind_queue_length, 30);
    let seen: Arc<std::sync::Mutex<Vec<(String, u32)>>> = Arc::default();
    let record = seen.clone();
    let flusher = cache
        .write_behind_flusher(move |job: cache_runtime::Job<u32>| {
            let seen = record.clone();
            async move {
                seen.lock().unwrap().push((job.key().to_owned(), *job.job()));
                Ok::<(), String>(())
            }
        })
        .start()
        .unwrap();
    eventually("the queue drained", || async { cache.stats().await.unwrap().write_behind_queue_length == 0 })
        .await;
    let seen = seen.lock().unwrap().clone();
    for key in ["a", "b", "c"] {
        let order: Vec<u32> = seen.iter().filter(|(k, _)| k == key).map(|(_, n)| *n).collect();
        assert_eq!(order, (1..=10).collect::<Vec<_>>(), "key {key}");
    }
    assert_eq!(cache.stats().await.unwrap().write_behind_applied, 30);
    flusher.shutdown().await;
}
