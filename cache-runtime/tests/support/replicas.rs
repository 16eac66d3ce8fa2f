//! Instances as OS processes: a binary (the `replicas` test or example) runs
//! itself again as a child with `CACHE_REPLICA_ROLE` set, and the parent
//! drives its children over stdin and reads their results from stdout.
//!
//! - Coherence: one writer invalidates a `#[cached(near = true)]` function
//!   while two readers read it in a loop; each read's start and value are
//!   checked against the moments the writer's invalidations returned.
//! - Fleet stampede: 4 processes x 250 callers x 100 cold keys; the bodies
//!   count their runs in a second Redis, the "database".

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cache_runtime::{cached, Cache, CacheConfig};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::support::{unique_prefix, Redis};

const ROLE: &str = "CACHE_REPLICA_ROLE";

/// Nanoseconds since the epoch: the processes share the machine's clock.
fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

static DB: OnceLock<redis::aio::MultiplexedConnection> = OnceLock::new();

fn db() -> redis::aio::MultiplexedConnection {
    DB.get().expect("the child's database connection").clone()
}

/// The value under test: the writer's version of `key`, read from the database.
#[cached(near = true, prefix = "version", ttl = 60)]
async fn version(key: u64) -> Result<u64, String> {
    let found: Option<u64> = db().get(format!("truth:{key}")).await.map_err(|e| e.to_string())?;
    Ok(found.unwrap_or(0))
}

/// A cold key whose body takes `BODY_MS` and counts its runs in the database.
#[cached(prefix = "slow", ttl = 300)]
async fn slow(key: u64) -> Result<u64, String> {
    let mut db = db();
    let _: u64 = db.incr(format!("runs:{key}"), 1).await.map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(env_u64("BODY_MS"))).await;
    let _: u64 = db.incr(format!("done:{key}"), 1).await.map_err(|e| e.to_string())?;
    Ok(key * 2)
}

fn env_u64(name: &str) -> u64 {
    std::env::var(format!("CACHE_REPLICA_{name}")).ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn env_str(name: &str) -> String {
    std::env::var(format!("CACHE_REPLICA_{name}")).unwrap_or_default()
}

/// Runs this process as a child if it was started as one; `false` otherwise.
pub fn child() -> bool {
    let Ok(role) = std::env::var(ROLE) else { return false };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let db =
            redis::Client::open(env_str("DB")).unwrap().get_multiplexed_async_connection().await.unwrap();
        let _ = DB.set(db);
        let config = CacheConfig::builder()
            .redis_url(env_str("URL"))
            .key_prefix(env_str("PREFIX"))
            .fleet_lease_ttl(Duration::from_millis(env_u64("LEASE_MS").max(100)))
            .circuit_breaker_timeout(Duration::from_millis(500))
            // Several instances: an outage is served by the function, never by
            // a local tier that hears only this process.
            .local_fallback(false)
            .health_check_interval(Duration::from_millis(200))
            .build()
            .unwrap();
        let cache = cache_runtime::init(config).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cache.stats().await.unwrap().bus_listening && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut input = BufReader::new(tokio::io::stdin()).lines();
        say(&Line::Ready);
        match role.as_str() {
            "reader" => reader(&mut input).await,
            "writer" => writer(cache, &mut input).await,
            "stampede" => stampede_child(&mut input).await,
            other => panic!("no role {other}"),
        }
    });
    true
}

/// What a child says, one JSON line each.
#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "snake_case")]
enum Line {
    Ready,
    /// The writer's invalidations: the version each made current, when it returned.
    Returned {
        returned: Vec<(u64, u64)>,
        deferred: u64,
    },
    /// A reader's reads checked against the writer's returns.
    Read {
        reads: u64,
        stale_after_return: u64,
        stale_after_bound: u64,
        visible_ns: Vec<u64>,
        errors: u64,
    },
    Stampede {
        calls: u64,
        errors: u64,
        slowest_ms: u64,
        faults: u64,
        breaker_opened: u64,
        fills_refused: u64,
    },
}

fn say(line: &Line) {
    println!("{}", serde_json::to_string(line).unwrap());
}

async fn wait_for(input: &mut Lines<BufReader<tokio::io::Stdin>>, word: &str) -> String {
    loop {
        match input.next_line().await {
            Ok(Some(line)) if line.starts_with(word) => return line,
            Ok(Some(_)) => {}
            _ => std::process::exit(0),
        }
    }
}

/// The invalidation under test: through the cache, or (the control) a raw
/// DEL that no other instance hears of.
async fn writer(cache: &Cache, input: &mut Lines<BufReader<tokio::io::Stdin>>) {
    wait_for(input, "go").await;
    let (count, every) = (env_u64("INVALIDATIONS"), Duration::from_millis(env_u64("EVERY_MS")));
    let raw = env_str("INVALIDATE") == "raw";
    let mut db = db();
    let mut returned = Vec::new();
    let mut deferred = 0;
    for v in 1..=count {
        let _: () = db.set("truth:1", v).await.unwrap();
        let done = if raw {
            let mut conn =
                redis::Client::open(env_str("URL")).unwrap().get_multiplexed_async_connection().await;
            match conn.as_mut() {
                Ok(conn) => conn.del::<_, u64>(cache_key(cache)).await.map(drop).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        } else {
            version_invalidate(1).await.map(drop).map_err(|e| e.to_string())
        };
        match done {
            Ok(()) => returned.push((v, now_ns())),
            Err(_) => deferred += 1,
        }
        tokio::time::sleep(every).await;
    }
    say(&Line::Returned { returned, deferred });
}

fn cache_key(cache: &Cache) -> String {
    format!("{}:{}", cache.config().key_prefix(), version_key(1))
}

/// Reads every ~100 µs until told to stop, then checks each read against the
/// writer's returns: a read that began after version `v` returned and gave
/// less than `v` is stale.
async fn reader(input: &mut Lines<BufReader<tokio::io::Stdin>>) {
    wait_for(input, "go").await;
    let stop = Arc::new(AtomicBool::new(false));
    // A thread of its own: a timer on the runtime ticks every millisecond at best.
    let reads = {
        let (stop, runtime) = (stop.clone(), tokio::runtime::Handle::current());
        std::thread::spawn(move || {
            let mut reads: Vec<(u64, u64)> = Vec::with_capacity(1 << 16);
            let mut errors = 0;
            while !stop.load(Ordering::Relaxed) {
                let started = now_ns();
                match runtime.block_on(version(1)) {
                    Ok(v) => reads.push((started, v)),
                    Err(_) => errors += 1,
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            (reads, errors)
        })
    };
    wait_for(input, "stop").await;
    stop.store(true, Ordering::Relaxed);
    let (reads, errors) = tokio::task::spawn_blocking(move || reads.join().unwrap()).await.unwrap();
    let line = wait_for(input, "returned ").await;
    let returned: Vec<(u64, u64)> = serde_json::from_str(&line["returned ".len()..]).unwrap();
    let bound = Duration::from_millis(env_u64("BOUND_MS")).as_nanos() as u64;
    // The newest version whose invalidation had returned by `t` (returns are in order).
    let current_at = |t: u64| returned.iter().take_while(|&&(_, at)| at < t).last().map_or(0, |&(v, _)| v);
    let (mut stale_after_return, mut stale_after_bound) = (0, 0);
    for &(started, got) in &reads {
        stale_after_return += u64::from(got < current_at(started));
        stale_after_bound += u64::from(got < current_at(started.saturating_sub(bound)));
    }
    // Per invalidation: how long after it returned this reader still saw something older.
    let visible_ns = returned
        .iter()
        .map(|&(v, at)| {
            let last_stale =
                reads.iter().filter(|&&(started, got)| started > at && got < v).map(|&(s, _)| s).max();
            last_stale.map_or(0, |s| s - at)
        })
        .collect();
    say(&Line::Read { reads: reads.len() as u64, stale_after_return, stale_after_bound, visible_ns, errors });
}

/// 250 callers on each of 100 cold keys, at once.
async fn stampede_child(input: &mut Lines<BufReader<tokio::io::Stdin>>) {
    wait_for(input, "go").await;
    let (keys, callers) = (env_u64("KEYS"), env_u64("CALLERS"));
    let mut calls = Vec::new();
    for key in 0..keys {
        for _ in 0..callers {
            calls.push(tokio::spawn(async move {
                let started = Instant::now();
                let ok = slow(key).await == Ok(key * 2);
                (ok, started.elapsed())
            }));
        }
    }
    let (mut errors, mut slowest) = (0, Duration::ZERO);
    for call in &mut calls {
        let (ok, took) = call.await.unwrap();
        errors += u64::from(!ok);
        slowest = slowest.max(took);
    }
    let stats = cache_runtime::get_cache().stats().await.unwrap();
    say(&Line::Stampede {
        calls: calls.len() as u64,
        errors,
        slowest_ms: slowest.as_millis() as u64,
        faults: stats.errors,
        breaker_opened: stats.breaker_opened,
        fills_refused: stats.fills_refused,
    });
}

/// A child process and its stdout.
struct Replica {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Replica {
    fn start(role: &str, env: &[(&str, String)]) -> Replica {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command.env(ROLE, role).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        for (name, value) in env {
            command.env(format!("CACHE_REPLICA_{name}"), value);
        }
        let mut child = command.kill_on_drop(true).spawn().expect("start a replica");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Replica { child, lines }
    }

    async fn next(&mut self) -> Option<Line> {
        loop {
            let line = self.lines.next_line().await.ok()??;
            if let Ok(parsed) = serde_json::from_str(&line) {
                return Some(parsed);
            }
        }
    }

    async fn ready(&mut self) {
        assert!(matches!(self.next().await, Some(Line::Ready)), "a replica did not start");
    }

    async fn tell(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
    }
}

/// What may happen to Redis in the middle of a coherence run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// `CLIENT KILL TYPE pubsub`: every listener loses its connection.
    ListenersKilled,
    /// The cache's Redis is killed and started again, empty.
    RedisRestart,
    /// The control: invalidations bypass the cache (a raw DEL), so nobody hears them.
    RawDelete,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::ListenersKilled => "listeners_killed",
            Fault::RedisRestart => "redis_restart",
            Fault::RawDelete => "raw_delete_control",
        }
    }
}

#[derive(Debug, Default)]
pub struct Coherence {
    pub invalidations: u64,
    pub deferred: u64,
    pub reads: u64,
    pub read_errors: u64,
    pub stale_reads_after_return: u64,
    pub stale_reads_after_bound: u64,
    pub p50_visible_ms: f64,
    pub p99_visible_ms: f64,
    pub max_visible_ms: f64,
}

/// 1 writer and 2 readers as processes on `cache_redis` (restarted for
/// [`Fault::RedisRestart`], so it must be our own then); the database is a
/// Redis of its own. Stale reads are counted after each return and after `bound`.
pub async fn coherence(
    cache_redis: &mut Redis,
    fault: Fault,
    invalidations: u64,
    bound: Duration,
) -> Coherence {
    let db = Redis::spawn();
    let invalidate = if fault == Fault::RawDelete { "raw" } else { "cache" };
    let env = vec![
        ("URL", cache_redis.url().to_owned()),
        ("DB", db.url().to_owned()),
        ("PREFIX", unique_prefix("replicas")),
        ("INVALIDATIONS", invalidations.to_string()),
        ("EVERY_MS", "20".to_owned()),
        ("BOUND_MS", bound.as_millis().to_string()),
        ("INVALIDATE", invalidate.to_owned()),
    ];
    let mut writer = Replica::start("writer", &env);
    let mut readers = [Replica::start("reader", &env), Replica::start("reader", &env)];
    writer.ready().await;
    for r in &mut readers {
        r.ready().await;
    }
    for r in &mut readers {
        r.tell("go").await;
    }
    writer.tell("go").await;
    let middle = Duration::from_millis(20 * invalidations / 2);
    tokio::time::sleep(middle).await;
    match fault {
        Fault::ListenersKilled => {
            let mut raw = cache_redis.raw().await;
            let _: u64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut raw)
                .await
                .unwrap();
        }
        Fault::RedisRestart => cache_redis.restart(),
        Fault::None | Fault::RawDelete => {}
    }
    let Some(Line::Returned { returned, deferred }) = writer.next().await else {
        panic!("the writer failed")
    };
    for r in &mut readers {
        r.tell("stop").await;
        r.tell(&format!("returned {}", serde_json::to_string(&returned).unwrap())).await;
    }
    let mut figures = Coherence { invalidations: returned.len() as u64, deferred, ..Coherence::default() };
    let mut visible = Vec::new();
    for r in &mut readers {
        let Some(Line::Read { reads, stale_after_return, stale_after_bound, visible_ns, errors }) =
            r.next().await
        else {
            panic!("a reader failed")
        };
        figures.reads += reads;
        figures.read_errors += errors;
        figures.stale_reads_after_return += stale_after_return;
        figures.stale_reads_after_bound += stale_after_bound;
        visible.extend(visible_ns);
    }
    visible.sort_unstable();
    let at = |q: f64| visible.get(((visible.len() as f64 * q) as usize).min(visible.len().saturating_sub(1)));
    let ms = |ns: Option<&u64>| ns.map_or(0.0, |&ns| ns as f64 / 1e6);
    figures.p50_visible_ms = ms(at(0.50));
    figures.p99_visible_ms = ms(at(0.99));
    figures.max_visible_ms = ms(visible.last());
    figures
}

#[derive(Debug, Default)]
pub struct Stampede {
    pub processes: u64,
    pub keys: u64,
    pub calls: u64,
    pub caller_errors: u64,
    /// Body runs started per key, the killed holder's included.
    pub body_runs_per_key_max: u64,
    /// Body runs that finished, per key.
    pub finished_runs_per_key_max: u64,
    /// Processes that never reported (hung past the deadline).
    pub hung: u64,
    pub slowest_call_ms: u64,
    /// Cache faults the callers absorbed, over every process.
    pub faults: u64,
    pub breaker_opened: u64,
    pub fills_refused: u64,
}

/// `processes` x `callers` x `keys` cold keys whose body takes `body`. With
/// `kill_holder`, one process starts first, takes every lease, and is killed
/// (SIGKILL) mid-body while the others wait; `lease` is the fleet lease's TTL.
pub async fn stampede(
    cache_redis: &Redis,
    processes: u64,
    callers: u64,
    keys: u64,
    body: Duration,
    lease: Duration,
    kill_holder: bool,
) -> Stampede {
    let db = Redis::spawn();
    let prefix = unique_prefix("stampede");
    let env = |body: Duration| {
        vec![
            ("URL", cache_redis.url().to_owned()),
            ("DB", db.url().to_owned()),
            ("PREFIX", prefix.clone()),
            ("KEYS", keys.to_string()),
            ("CALLERS", callers.to_string()),
            ("BODY_MS", body.as_millis().to_string()),
            ("LEASE_MS", lease.as_millis().to_string()),
        ]
    };
    let mut victim = kill_holder.then(|| Replica::start("stampede", &env(Duration::from_secs(600))));
    let survivors = processes - u64::from(kill_holder);
    let mut replicas: Vec<Replica> = (0..survivors).map(|_| Replica::start("stampede", &env(body))).collect();
    for r in victim.iter_mut().chain(&mut replicas) {
        r.ready().await;
    }
    let mut raw_db = db.raw().await;
    if let Some(victim) = &mut victim {
        victim.tell("go").await;
        // Every key's body has begun in the victim: it holds every lease.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let started: Vec<String> =
                redis::cmd("KEYS").arg("runs:*").query_async(&mut raw_db).await.unwrap();
            if started.len() as u64 == keys {
                break;
            }
            assert!(Instant::now() < deadline, "the holder did not start every body");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for r in &mut replicas {
        r.tell("go").await;
    }
    if let Some(mut victim) = victim.take() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        victim.child.start_kill().unwrap();
        let _ = victim.child.wait().await;
    }
    let mut figures = Stampede { processes, keys, ..Stampede::default() };
    let deadline = lease * 4 + body * 4 + Duration::from_secs(30);
    for r in &mut replicas {
        match tokio::time::timeout(deadline, r.next()).await {
            Ok(Some(Line::Stampede { calls, errors, slowest_ms, faults, breaker_opened, fills_refused })) => {
                figures.faults += faults;
                figures.breaker_opened += breaker_opened;
                figures.fills_refused += fills_refused;
                figures.calls += calls;
                figures.caller_errors += errors;
                figures.slowest_call_ms = figures.slowest_call_ms.max(slowest_ms);
            }
            _ => figures.hung += 1,
        }
    }
    let counts = |pattern: &'static str| {
        let mut raw_db = raw_db.clone();
        async move {
            let names: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut raw_db).await.unwrap();
            let mut per_key = HashMap::new();
            for name in names {
                let n: u64 = raw_db.get(&name).await.unwrap();
                per_key.insert(name, n);
            }
            per_key.values().copied().max().unwrap_or(0)
        }
    };
    figures.body_runs_per_key_max = counts("runs:*").await;
    figures.finished_runs_per_key_max = counts("done:*").await;
    figures
}
