//! Per-key fences under every fault: a fill that read before an invalidation
//! never lands after it returned Ok, whether the invalidation came from another
//! instance or another process, and whatever happened to Redis in between
//! (FLUSHALL, a restart, eviction of the internal keys, OOM). And fills of
//! other keys are not refused.

mod support;

use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cache_runtime::__private::{
    always, get_or_compute, Attached, Call, KeyBuilder, Plain, Sharing, Spec, Tags,
};
use cache_runtime::{Cache, CacheConfig, CacheError, Mode};
use redis::AsyncCommands;
use support::{unique_prefix, Redis};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

const SPEC: Spec = Spec::named("race").with_prefix("race");
/// What the database held when the racing fill read it; the update writes 2.
const OLD: u64 = 1;

fn call(cache: &Cache, id: u32) -> Call<'_> {
    let mut key = KeyBuilder::new(cache, &SPEC);
    key.arg(&id);
    Call { cache, spec: &SPEC, key: key.finish() }
}

fn tags(id: u32) -> Tags {
    Tags::Owned(vec!["race".into(), format!("race:{id}")])
}

/// The engine on key `id` with its tags: what a `#[cached]` function expands to.
async fn fill(cache: &Cache, id: u32, body: impl std::future::Future<Output = u64>) -> u64 {
    let miss = move || (tags(id), body);
    get_or_compute::<Plain, u64, _, _, _, _>(
        call(cache, id),
        always,
        Sharing::none(),
        Sharing::none(),
        Attached,
        miss,
    )
    .await
}

fn relative_key(cache: &Cache, id: u32) -> String {
    call(cache, id).key.into_relative()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Key,
    Tag,
    Pattern,
    All,
}

const KINDS: [Kind; 4] = [Kind::Key, Kind::Tag, Kind::Pattern, Kind::All];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Key => "key",
            Kind::Tag => "tag",
            Kind::Pattern => "pattern",
            Kind::All => "all",
        }
    }

    fn parse(s: &str) -> Kind {
        KINDS.into_iter().find(|k| k.name() == s).unwrap()
    }

    async fn run(self, cache: &Cache, id: u32) -> Result<u64, CacheError> {
        match self {
            Kind::Key => cache.delete(&relative_key(cache, id)).await.map(u64::from),
            Kind::Tag => cache.invalidate_tags([format!("race:{id}")]).await,
            Kind::Pattern => cache.delete_pattern(&format!("race:v?:{id}")).await,
            Kind::All => cache.clear().await,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    FlushAll,
    /// The fence hash and every tag index deleted, as an eviction would.
    InternalKeysGone,
    Restart,
}

/// Who invalidates: another instance in this process, or another process.
enum Writer {
    Instance(Cache),
    Process(Box<ChildWriter>),
}

impl Writer {
    async fn invalidate(&mut self, kind: Kind, id: u32) -> bool {
        match self {
            Writer::Instance(cache) => kind.run(cache, id).await.is_ok(),
            Writer::Process(child) => child.invalidate(kind, id).await,
        }
    }

    /// After a restart: waits (up to 5 s) until the writer reaches Redis again,
    /// so the next round's invalidation can return Ok rather than be queued.
    async fn reconnected(&self) {
        let Writer::Instance(cache) = self else { return };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !cache.health().await.connected && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn config(url: &str, prefix: &str) -> CacheConfig {
    // A restart must not open the breaker for the rest of the run.
    CacheConfig::builder()
        .redis_url(url)
        .key_prefix(prefix)
        .circuit_breaker_threshold(1_000_000)
        .build()
        .unwrap()
}

/// Small jitter without a dependency: a few microseconds to a third of a millisecond.
fn jitter(round: u32) -> Duration {
    Duration::from_micros(u64::from(round.wrapping_mul(2_654_435_761) >> 20) % 300)
}

#[derive(Default, Debug)]
struct Tally {
    rounds: u32,
    returned_ok: u32,
    stale_after_ok: u32,
}

impl Tally {
    fn count(&mut self, returned_ok: bool, stale_after_ok: bool) {
        self.rounds += 1;
        self.returned_ok += u32::from(returned_ok);
        self.stale_after_ok += u32::from(stale_after_ok);
    }
}

/// A fill of `id` that has read the old value and waits, inside its body, for
/// `release` before it writes.
async fn paused_fill(reader: &Cache, id: u32) -> (tokio::task::JoinHandle<u64>, Arc<Notify>) {
    let in_body = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let fill = {
        let (reader, in_body, release) = (reader.clone(), in_body.clone(), release.clone());
        tokio::spawn(async move {
            fill(&reader, id, async move {
                in_body.notify_one();
                release.notified().await;
                OLD
            })
            .await
        })
    };
    in_body.notified().await;
    (fill, release)
}

/// One race: a fill reads the old value and pauses; the writer updates and
/// invalidates; `fault` strikes; the fill resumes. Stale means Redis holds the
/// old value after the invalidation returned Ok.
async fn race(
    redis: &mut Redis,
    reader: &Cache,
    writer: &mut Writer,
    kind: Kind,
    fault: Fault,
    id: u32,
) -> (bool, bool) {
    let (fill, release) = paused_fill(reader, id).await;
    let ok = writer.invalidate(kind, id).await;
    match fault {
        Fault::None => {}
        Fault::FlushAll => {
            let _: () = redis::cmd("FLUSHALL").query_async(&mut redis.raw().await).await.unwrap();
        }
        Fault::InternalKeysGone => {
            let mut raw = redis.raw().await;
            let prefix = reader.config().key_prefix();
            let internal: Vec<String> = raw.keys(format!("{prefix}#*")).await.unwrap();
            if !internal.is_empty() {
                let _: () = raw.del(internal).await.unwrap();
            }
        }
        Fault::Restart => redis.restart(),
    }
    tokio::time::sleep(jitter(id)).await;
    release.notify_one();
    assert_eq!(fill.await.unwrap(), OLD, "the caller gets its body's result");
    let full = format!("{}:{}", reader.config().key_prefix(), relative_key(reader, id));
    let stored: Option<Vec<u8>> = redis.raw().await.get(&full).await.unwrap();
    let stale = stored.is_some_and(|bytes| cache_runtime::codec::decode::<u64>(&bytes).unwrap() == OLD);
    (ok, ok && stale)
}

async fn rounds(
    redis: &mut Redis,
    reader: &Cache,
    writer: &mut Writer,
    fault: Fault,
    n: u32,
) -> Vec<(Kind, Tally)> {
    let mut out = Vec::new();
    for (k, kind) in KINDS.into_iter().enumerate() {
        let mut tally = Tally::default();
        for round in 0..n {
            let id = k as u32 * 100_000 + round;
            let (ok, stale) = race(redis, reader, writer, kind, fault, id).await;
            tally.count(ok, stale);
            if fault == Fault::Restart {
                writer.reconnected().await;
            }
        }
        println!("{fault:?} {kind:?}: {tally:?}");
        out.push((kind, tally));
    }
    out
}

fn assert_no_stale(results: &[(Kind, Tally)], fault: Fault) {
    for (kind, tally) in results {
        assert_eq!(tally.stale_after_ok, 0, "{fault:?} {kind:?}: {tally:?}");
        assert!(tally.returned_ok > 0, "{fault:?} {kind:?}: no invalidation returned Ok: {tally:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_no_stale_fill_under_flush_eviction_and_restart() {
    let mut redis = Redis::spawn();
    let prefix = unique_prefix("fence2i");
    let reader = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    let mut writer = Writer::Instance(Cache::new(config(redis.url(), &prefix)).await.unwrap());
    for (fault, n) in
        [(Fault::None, 500), (Fault::FlushAll, 500), (Fault::InternalKeysGone, 500), (Fault::Restart, 8)]
    {
        let results = rounds(&mut redis, &reader, &mut writer, fault, n).await;
        assert_no_stale(&results, fault);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_cache_aside_without_a_fence_is_caught_stale() {
    // The same race with the fill done as the design documents' cache-aside
    // (GET, body, SET): no fence, and the check above must see every stale
    // write, or it proves nothing.
    let mut redis = Redis::spawn();
    let prefix = unique_prefix("control");
    let reader = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    let writer = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    for (k, kind) in KINDS.into_iter().enumerate() {
        let mut stale = 0;
        for id in (0..50u32).map(|i| k as u32 * 1000 + i) {
            let key = relative_key(&reader, id);
            assert_eq!(reader.get::<u64>(&key).await.unwrap(), None);
            // (body: reads OLD) … meanwhile the update and its invalidation:
            kind.run(&writer, id).await.unwrap();
            reader.set(&key, &OLD).tags(["race".to_owned(), format!("race:{id}")]).await.unwrap();
            let full = format!("{prefix}:{key}");
            let stored: Option<Vec<u8>> = redis.raw().await.get(&full).await.unwrap();
            stale +=
                u32::from(stored.is_some_and(|b| cache_runtime::codec::decode::<u64>(&b).unwrap() == OLD));
        }
        assert_eq!(stale, 50, "{kind:?}: the unfenced fill lands every time");
    }
    redis.kill();
}

/// The invalidating half of the two-process race, in a child process.
struct ChildWriter {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    replies: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

const CHILD_ENV: &str = "CACHE_FENCES_CHILD";
const REPLY: &str = "fence-reply ";

impl ChildWriter {
    fn spawn(url: &str, prefix: &str) -> ChildWriter {
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "two_processes_no_stale_fill", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, format!("{url} {prefix}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let replies = BufReader::new(child.stdout.take().unwrap()).lines();
        ChildWriter { child, stdin, replies }
    }

    async fn invalidate(&mut self, kind: Kind, id: u32) -> bool {
        self.stdin.write_all(format!("{} {id}\n", kind.name()).as_bytes()).await.unwrap();
        loop {
            let line = self.replies.next_line().await.unwrap().expect("the child writer exited");
            // libtest may have started the line ("test … "): the marker finds the reply.
            if let Some((_, reply)) = line.split_once(REPLY) {
                return reply == "ok";
            }
        }
    }
}

/// Runs in the child: invalidations read from stdin, one reply line each.
async fn serve_as_child(spec: &str) {
    let (url, prefix) = spec.split_once(' ').unwrap();
    let cache = Cache::new(config(url, prefix)).await.unwrap();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        let (kind, id) = line.split_once(' ').unwrap();
        let reply = match Kind::parse(kind).run(&cache, id.parse().unwrap()).await {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("err {e}"),
        };
        println!("{REPLY}{reply}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_no_stale_fill() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return serve_as_child(&spec).await;
    }
    let mut redis = Redis::spawn();
    let prefix = unique_prefix("fence2p");
    let reader = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    let mut writer = Writer::Process(Box::new(ChildWriter::spawn(redis.url(), &prefix)));
    for (fault, n) in [(Fault::None, 500), (Fault::FlushAll, 100), (Fault::InternalKeysGone, 100)] {
        let results = rounds(&mut redis, &reader, &mut writer, fault, n).await;
        assert_no_stale(&results, fault);
    }
    if let Writer::Process(mut child) = writer {
        drop(child.stdin);
        let _ = child.child.wait().await;
    }
}

async fn info_field(raw: &mut redis::aio::MultiplexedConnection, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("memory").query_async(raw).await.unwrap();
    info.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).unwrap().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_with_noeviction_never_lets_the_old_fill_land() {
    let redis = Redis::spawn_with_args(&["--maxmemory-policy", "noeviction"]);
    let prefix = unique_prefix("oom");
    let reader = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    let writer = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    let mut raw = redis.raw().await;
    let mut tally = Tally::default();
    for round in 0..40u32 {
        let (fill, release) = paused_fill(&reader, round).await;
        // Every write is refused from here on: the fence can't be recorded.
        let used = info_field(&mut raw, "used_memory").await;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(used / 2)
            .query_async(&mut raw)
            .await
            .unwrap();
        let kind = KINDS[round as usize % 4];
        let ok = kind.run(&writer, round).await.is_ok();
        // Memory again, so a fill that is let through can land.
        let _: () =
            redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0).query_async(&mut raw).await.unwrap();
        release.notify_one();
        fill.await.unwrap();
        let full = format!("{prefix}:{}", relative_key(&reader, round));
        let stored: Option<Vec<u8>> = raw.get(&full).await.unwrap();
        tally.count(ok, ok && stored.is_some());
    }
    println!("OOM: {tally:?}");
    assert_eq!(tally.stale_after_ok, 0, "{tally:?}");
    assert!(tally.returned_ok > 0, "some invalidations must apply under OOM: {tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_eviction_of_internal_keys_never_serves_a_tagged_entry_after_invalidation() {
    for policy in ["allkeys-lru", "volatile-lru"] {
        let redis = Redis::spawn_with_args(&["--maxmemory", "4mb", "--maxmemory-policy", policy]);
        let prefix = unique_prefix("evict");
        let cache = Cache::new(config(redis.url(), &prefix)).await.unwrap();
        let mut raw = redis.raw().await;
        let mut survivors = 0;
        let mut invalidated = 0;
        for round in 0..20u32 {
            let tag = format!("group:{round}");
            for i in 0..50u32 {
                let key = format!("item:{round}:{i}");
                cache.set(&key, &vec![round; 64]).ttl(600).tags([tag.as_str()]).await.unwrap();
            }
            for i in 0..50u32 {
                // Read-heavy traffic touches the entries, never the index.
                let _ = cache.get::<Vec<u32>>(&format!("item:{round}:{i}")).await;
            }
            // Another tenant's burst of a few MB.
            let mut pipe = redis::pipe();
            for j in 0..4_000u32 {
                pipe.set_ex(format!("other:{round}:{j}"), vec![0u8; 1024], 600).ignore();
            }
            let _: Result<(), _> = pipe.query_async(&mut raw).await;
            if cache.invalidate_tags([tag.as_str()]).await.is_ok() {
                invalidated += 1;
                for i in 0..50u32 {
                    survivors += u32::from(
                        cache.get::<Vec<u32>>(&format!("item:{round}:{i}")).await.unwrap().is_some(),
                    );
                }
            }
        }
        let evicted = {
            let info: String = redis::cmd("INFO").arg("stats").query_async(&mut raw).await.unwrap();
            info.lines().find_map(|l| l.strip_prefix("evicted_keys:")).unwrap().trim().parse::<u64>().unwrap()
        };
        println!("{policy}: {invalidated} tag invalidations returned Ok, {evicted} keys evicted, {survivors} tagged entries readable after");
        assert!(evicted > 0, "{policy}: the burst evicted nothing, so this proves nothing");
        assert!(invalidated > 0);
        assert_eq!(survivors, 0, "{policy}: tagged entries readable after their tag was invalidated");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_some_keys_does_not_refuse_the_fills_of_others() {
    let redis = Redis::spawn();
    let prefix = unique_prefix("perkey");
    let reader = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    let writer = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    // Another instance invalidates unrelated keys (by key, tag and pattern) all the time.
    let churn = {
        let (writer, stop) = (writer.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u32;
            while stop.load(Ordering::Relaxed) == 0 {
                let _ = writer.delete(&format!("unrelated:{i}")).await;
                let _ = writer.invalidate_tags([format!("unrelated:{i}")]).await;
                let _ = writer.delete_pattern(&format!("unrelated:{i}:*")).await;
                i += 1;
            }
        })
    };
    for id in 0..130u32 {
        let runs = runs.clone();
        fill(&reader, id, async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(30)).await;
            u64::from(id)
        })
        .await;
    }
    stop.store(1, Ordering::Relaxed);
    churn.await.unwrap();
    let stats = reader.stats().await.unwrap();
    assert_eq!(stats.fills_refused, 0, "fills of keys nobody invalidated were refused");
    for id in 0..130u32 {
        assert_eq!(reader.get::<u64>(&relative_key(&reader, id)).await.unwrap(), Some(u64::from(id)));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 130);
    // An unreadable entry's removal does not refuse its replacement.
    let full = format!("{prefix}:{}", relative_key(&reader, 1));
    let _: () = redis.raw().await.set(&full, b"garbage".as_slice()).await.unwrap();
    for _ in 0..2 {
        fill(&reader, 1, async { 11u64 }).await;
    }
    assert_eq!(reader.get::<u64>(&relative_key(&reader, 1)).await.unwrap(), Some(11));
    assert_eq!(reader.mode(), Mode::Redis);
}

/// One pause of Redis during an invalidation: what the call returned, stale reads
/// another instance made after an `Ok`, and how long after Redis took writes
/// again the other instance still read the old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses_during_an_invalidation_bound_the_window() {
    let redis = Redis::spawn_with_args(&["--enable-debug-command", "yes"]);
    let prefix = unique_prefix("pause");
    let reader = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    let writer = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    for pause in ["CLIENT PAUSE 2000 WRITE", "DEBUG SLEEP 2"] {
        let key = format!("item:{}", pause.len());
        writer.set(&key, &OLD).await.unwrap();
        // Connections made before the pause, without a response timeout of their own.
        let unbounded = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let client = redis::Client::open(redis.url()).unwrap();
        let mut probe = client.get_multiplexed_async_connection_with_config(&unbounded).await.unwrap();
        let mut raw = client.get_multiplexed_async_connection_with_config(&unbounded).await.unwrap();
        let started = tokio::time::Instant::now();
        let pauser = {
            tokio::spawn(async move {
                let mut cmd = redis::cmd(pause.split(' ').next().unwrap());
                cmd.arg(pause.split(' ').skip(1).collect::<Vec<_>>());
                let _: redis::Value = cmd.query_async(&mut raw).await.unwrap();
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let result = writer.delete(&key).await;
        let returned = tokio::time::Instant::now();
        // When Redis takes writes again, seen from outside the cache.
        let answered = loop {
            let write = probe.set_ex::<_, _, ()>(format!("{prefix}#writable"), 1, 5);
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(20), write).await {
                break tokio::time::Instant::now();
            }
        };
        pauser.await.unwrap();
        let mut last_stale = None;
        let mut stale_after_ok = 0;
        while tokio::time::Instant::now() < answered + Duration::from_secs(2) {
            if reader.get::<u64>(&key).await.ok().flatten() == Some(OLD) {
                let now = tokio::time::Instant::now();
                last_stale = Some(now);
                stale_after_ok += u32::from(result.is_ok() && now > returned);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let window = last_stale.map_or(Duration::ZERO, |t| t.saturating_duration_since(answered));
        println!(
            "{pause}: returned {} after {:?}; stale reads after an Ok: {stale_after_ok}; old value readable {:?} after Redis took writes again",
            match &result { Ok(_) => "Ok".to_owned(), Err(e) => format!("Err({e})") },
            returned - started,
            window,
        );
        assert_eq!(stale_after_ok, 0, "{pause}");
        assert!(matches!(result, Ok(_) | Err(CacheError::Deferred(_))), "{pause}: {result:?}");
        // The retry runs every 200 ms whatever the breaker says; a loaded machine gets slack.
        assert!(
            window < Duration::from_millis(1500),
            "{pause}: the old value stayed readable for {window:?}"
        );
        assert_eq!(
            reader.get::<u64>(&key).await.ok().flatten(),
            None,
            "{pause}: the invalidation never landed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_an_older_snapshot_brings_nothing_invalidated_back() {
    let mut redis = Redis::spawn();
    let prefix = unique_prefix("snapshot");
    let cache = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    cache.set("mission:1", &OLD).tags(["missions"]).await.unwrap();
    let _: () = redis::cmd("SAVE").query_async(&mut redis.raw().await).await.unwrap();
    assert!(cache.delete("mission:1").await.unwrap());
    // Killed before it saved again: it comes back with the old entry and an older fence.
    redis.restart();
    let full = format!("{prefix}:mission:1");
    let back: Option<Vec<u8>> = redis.raw().await.get(&full).await.unwrap();
    assert!(back.is_some(), "control: the snapshot brought the invalidated entry back");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match cache.get::<u64>("mission:1").await {
            Ok(value) => {
                assert_eq!(value, None, "an entry invalidated before the restart was served");
                break;
            }
            Err(_) => {
                assert!(tokio::time::Instant::now() < deadline, "never reconnected");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let gone: Option<Vec<u8>> = redis.raw().await.get(&full).await.unwrap();
    assert_eq!(gone, None, "the prefix was cleared when the server changed");
}
