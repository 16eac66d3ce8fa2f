//! The write-behind crash run: a child OS process (this test binary run
//! again) queues jobs and flushes them into a "database" (hashes in the test's
//! Redis) through a handler that takes a little time; the parent SIGKILLs it
//! while jobs are queued and in flight, starts another child as the flusher,
//! waits until the queue is empty and counts what the database saw.
//!
//! The handler records every delivery (`HINCRBY deliveries {job} 1`) and
//! applies each job under its idempotency key (`HSETNX applied {key} {job}`),
//! counting effects per job and checking each cache key's sequence, all in one
//! script. `idempotent: false` applies every delivery (the control that shows
//! redeliveries do become duplicate effects without the key), and
//! [`Queue::Memory`] queues the jobs in the child's memory instead (the
//! control that shows a kill loses jobs without a durable queue).

use std::process::Stdio;
use std::time::{Duration, Instant};

use cache_runtime::{Cache, CacheConfig, Job};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::support::{unique_prefix, Redis};

const ROLE: &str = "CACHE_WB_ROLE";

/// The name of the test that runs a child: the parent starts this binary with it.
pub const CHILD_TEST: &str = "write_behind_child";

/// How the jobs reach the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// `Cache::write_behind` and a flusher.
    Durable,
    /// The seeds' `task_queue.enqueue` after a `set`: a channel in the process.
    Memory,
}

/// One crash run's settings.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub jobs: u64,
    pub keys: u64,
    pub queue: Queue,
    /// Whether the handler applies each job under its idempotency key.
    pub idempotent: bool,
    /// The child is killed once this many jobs took effect.
    pub kill_after: u64,
}

/// What the database saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub jobs: u64,
    /// Jobs `write_behind` returned `Ok` for that never took effect.
    pub lost: u64,
    pub applied_more_than_once: u64,
    pub delivered_more_than_once: u64,
    /// Effects out of their key's queue order.
    pub out_of_order: u64,
    /// Jobs in the queue, and read but not acknowledged, when the child was killed.
    pub queued_at_kill: u64,
    pub in_flight_at_kill: u64,
    pub seconds: f64,
}

impl Figures {
    /// The JSON line the crash test prints.
    pub fn json(&self) -> String {
        format!(
            r#"{{"figure":"write_behind_crash","jobs":{},"lost":{},"applied_more_than_once":{},"delivered_more_than_once":{},"out_of_order":{},"queued_at_kill":{},"in_flight_at_kill":{}}}"#,
            self.jobs,
            self.lost,
            self.applied_more_than_once,
            self.delivered_more_than_once,
            self.out_of_order,
            self.queued_at_kill,
            self.in_flight_at_kill
        )
    }
}

/// One write-behind job: which key, its place in that key's order, and its number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Save {
    pub n: u64,
    pub key: u64,
    pub seq: u64,
}

/// The database's keys, beside the cache's.
struct Db {
    deliveries: String,
    applied: String,
    effects: String,
    last: String,
    out_of_order: String,
}

impl Db {
    fn new(prefix: &str) -> Db {
        let key = |name: &str| format!("db:{prefix}:{name}");
        Db {
            deliveries: key("deliveries"),
            applied: key("applied"),
            effects: key("effects"),
            last: key("last"),
            out_of_order: key("out_of_order"),
        }
    }
}

const APPLY: &str = r"
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
if ARGV[5] == '1' and redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
local last = tonumber(redis.call('HGET', KEYS[4], ARGV[3]) or '0')
if tonumber(ARGV[4]) ~= last + 1 then redis.call('INCR', KEYS[5]) end
redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
return 1
";

fn env(name: &str) -> String {
    std::env::var(format!("CACHE_WB_{name}")).unwrap_or_default()
}

fn config(url: &str, prefix: &str) -> CacheConfig {
    CacheConfig::builder()
        .redis_url(url)
        .key_prefix(prefix)
        .write_behind_concurrency(16)
        .write_behind_lease_ttl(Duration::from_millis(3000))
        .write_behind_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .operation_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// Runs this process as a crash-run child if it was started as one; `false` otherwise.
pub fn child() -> bool {
    let Ok(role) = std::env::var(ROLE) else { return false };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let (url, prefix) = (env("URL"), env("PREFIX"));
        let cache = Cache::new(config(&url, &prefix)).await.unwrap();
        let db = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let idempotent = env("IDEMPOTENT") == "1";
        let record = move |job: Save, id: String, db: redis::aio::MultiplexedConnection| {
            apply(job, id, db, prefix.clone(), idempotent)
        };
        let (jobs, keys): (u64, u64) = (env("JOBS").parse().unwrap_or(0), env("KEYS").parse().unwrap_or(1));
        let mut input = BufReader::new(tokio::io::stdin()).lines();
        match role.as_str() {
            "memory" => {
                let (send, mut receive) = tokio::sync::mpsc::unbounded_channel::<Save>();
                for job in all_jobs(jobs, keys) {
                    cache.set(&format!("k{}", job.key), &job.n).await.unwrap();
                    send.send(job).unwrap();
                }
                say("queued");
                let mut n = 0u64;
                while let Some(job) = receive.recv().await {
                    n += 1;
                    record(job, format!("memory-{n}"), db.clone()).await.unwrap();
                }
            }
            "flusher" => {
                if jobs > 0 {
                    enqueue(&cache, jobs, keys).await;
                }
                let flusher = cache
                    .write_behind_flusher(move |job: Job<Save>| {
                        let (id, db) = (job.idempotency_key().to_owned(), db.clone());
                        record(job.into_job(), id, db)
                    })
                    .start()
                    .unwrap();
                say("queued");
                // Until the parent closes stdin (or kills this process).
                while let Ok(Some(_)) = input.next_line().await {}
                flusher.shutdown().await;
            }
            other => panic!("no role {other}"),
        }
    });
    true
}

/// Every job, in the order each key's jobs must take effect.
fn all_jobs(jobs: u64, keys: u64) -> impl Iterator<Item = Save> {
    (0..jobs).map(move |n| Save { n, key: n % keys, seq: n / keys + 1 })
}

/// Queues every job, one task per key so that each key's jobs are queued in order.
async fn enqueue(cache: &Cache, jobs: u64, keys: u64) {
    let tasks: Vec<_> = (0..keys)
        .map(|key| {
            let cache = cache.clone();
            tokio::spawn(async move {
                for job in all_jobs(jobs, keys).filter(|j| j.key == key) {
                    let queued = cache.write_behind(&format!("k{key}"), &job.n, &job).await;
                    assert!(queued.is_ok(), "job {} not queued: {queued:?}", job.n);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// The handler's body: applies `job` to the database, then takes a little more
/// time, as a real write's round trips would: a kill then finds jobs applied
/// and not acknowledged, which are delivered again.
async fn apply(
    job: Save,
    id: String,
    mut db: redis::aio::MultiplexedConnection,
    prefix: String,
    idempotent: bool,
) -> Result<(), String> {
    tokio::time::sleep(Duration::from_micros(500)).await;
    let keys = Db::new(&prefix);
    let _: i64 = redis::Script::new(APPLY)
        .key(&keys.deliveries)
        .key(&keys.applied)
        .key(&keys.effects)
        .key(&keys.last)
        .key(&keys.out_of_order)
        .arg(&id)
        .arg(job.n)
        .arg(job.key)
        .arg(job.seq)
        .arg(if idempotent { "1" } else { "0" })
        .invoke_async(&mut db)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(2)).await;
    Ok(())
}

fn say(word: &str) {
    println!("{{\"child\":\"{word}\"}}");
}

struct Process {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Process {
    fn start(role: &str, env: &[(&str, String)]) -> Process {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--ignored", "--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, value) in env {
            command.env(format!("CACHE_WB_{name}"), value);
        }
        let mut child = command.kill_on_drop(true).spawn().expect("start a write-behind child");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Process { child, lines }
    }

    /// Waits for the child to say `word`.
    async fn said(&mut self, word: &str) {
        let expected = format!("{{\"child\":\"{word}\"}}");
        let wait = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if line.ends_with(&expected) {
                    return;
                }
            }
            panic!("the child ended before saying {word}");
        };
        tokio::time::timeout(Duration::from_secs(60), wait).await.expect("the child did not answer in 60 s");
    }
}

/// One crash run on `redis`: see the module's comment.
pub async fn crash(redis: &Redis, run: Run) -> Figures {
    let started = Instant::now();
    let prefix = unique_prefix("wbcrash");
    let db = Db::new(&prefix);
    let mut raw = redis.raw().await;
    let observer = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    let env = |jobs: u64| {
        vec![
            ("URL", redis.url().to_owned()),
            ("PREFIX", prefix.clone()),
            ("JOBS", jobs.to_string()),
            ("KEYS", run.keys.to_string()),
            ("IDEMPOTENT", if run.idempotent { "1" } else { "0" }.to_owned()),
        ]
    };
    let role = match run.queue {
        Queue::Durable => "flusher",
        Queue::Memory => "memory",
    };
    let mut first = Process::start(role, &env(run.jobs));
    first.said("queued").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let took: u64 = redis::cmd("HLEN").arg(&db.effects).query_async(&mut raw).await.unwrap();
        if took >= run.kill_after {
            break;
        }
        assert!(Instant::now() < deadline, "only {took} jobs took effect in 60 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.child.start_kill().unwrap();
    let _ = first.child.wait().await;
    let stats = observer.stats().await.unwrap();
    let queued_at_kill = stats.write_behind_queue_length;
    let jobs_key = format!("{prefix}#wb:{{{prefix}}}:jobs");
    let in_flight_at_kill = match run.queue {
        Queue::Durable => {
            let summary: redis::Value =
                redis::cmd("XPENDING").arg(&jobs_key).arg("flusher").query_async(&mut raw).await.unwrap();
            match summary {
                redis::Value::Array(parts) => redis::from_redis_value(parts[0].clone()).unwrap_or(0),
                _ => 0,
            }
        }
        Queue::Memory => 0,
    };
    if run.queue == Queue::Durable {
        let mut second = Process::start("flusher", &env(0));
        second.said("queued").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while observer.stats().await.unwrap().write_behind_queue_length > 0 {
            assert!(Instant::now() < deadline, "the queue did not drain in 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Closing stdin asks for a graceful shutdown.
        drop(second.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(10), second.child.wait()).await;
    }
    let count = |hash: &str| {
        let hash = hash.to_owned();
        let mut raw = raw.clone();
        async move {
            let all: std::collections::HashMap<u64, u64> =
                redis::cmd("HGETALL").arg(hash).query_async(&mut raw).await.unwrap();
            all
        }
    };
    let effects = count(&db.effects).await;
    let deliveries = count(&db.deliveries).await;
    let out_of_order: Option<u64> =
        redis::cmd("GET").arg(&db.out_of_order).query_async(&mut raw).await.unwrap();
    Figures {
        jobs: run.jobs,
        lost: (0..run.jobs).filter(|n| !effects.contains_key(n)).count() as u64,
        applied_more_than_once: effects.values().filter(|&&n| n > 1).count() as u64,
        delivered_more_than_once: deliveries.values().filter(|&&n| n > 1).count() as u64,
        out_of_order: out_of_order.unwrap_or(0),
        queued_at_kill,
        in_flight_at_kill,
        seconds: started.elapsed().as_secs_f64(),
    }
}
