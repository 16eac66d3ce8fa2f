//! The Redis tier.
//!
//! Every command goes over multiplexed connections: concurrent requests are
//! pipelined on one socket, measured here at ~197k GET/s against ~27k/s for a
//! pool checkout per GET. No pool is kept at all: SCAN keeps its cursor on the
//! client side and the multi-key writes are Lua scripts or MULTI/EXEC sent as one
//! pipeline, so nothing needs a connection of its own.
//!
//! Each command runs under the operation timeout: a small one through the
//! connections' watchdog, a big one under a timer of its own. A caller dropped
//! mid-command leaves the connection in sync, because replies are matched to
//! requests by the connection's own driver task, not by the caller; a command
//! that times out or hits an I/O error poisons its connection (see `conn.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue};

use crate::background::Background;
use crate::conn::{Carries, Connections, Lease};

use crate::config::CacheConfig;
use crate::fence::FenceScripts;
use crate::misconfig::Misconfig;
use crate::store::ServerInfo;
use crate::CacheError;

/// Keys per SCAN page and per UNLINK batch.
const BATCH: usize = 1000;

/// The slowest transfer rate a big value's timeout allows for: a 1 Gbit/s link
/// at half its speed. A timeout that ignored size would cut off an 8 MiB value
/// queued behind others while Redis was answering all along.
const BULK_BYTES_PER_SEC: u64 = 64 << 20;

/// Which connections a command travels on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lane {
    /// The shared multiplexed connections of every small command.
    Hot,
    /// A connection of its own for a value of this many bytes: its reply does
    /// not hold up the small replies queued behind it on the hot connections.
    Bulk(usize),
}

pub(crate) struct RedisStore {
    conns: Arc<Connections>,
    bulk: Arc<Connections>,
    /// Bytes of big values on their way: a big command's timeout counts those
    /// queued ahead of it on the bulk connection.
    bulk_queued: AtomicU64,
    op_timeout: Duration,
    pub(crate) fences: FenceScripts,
}

impl RedisStore {
    /// Builds the store without connecting; [`connect`](Self::connect) tries once now.
    /// Credentials refused on a reconnect go to `misconfig`.
    pub(crate) fn new(
        config: &CacheConfig,
        url: &str,
        misconfig: Arc<Misconfig>,
        background: &Background,
    ) -> Result<Self, CacheError> {
        let runtime = background.handle().clone();
        let client = Client::open(url)?;
        // No response timeout: the watchdog bounds the small commands (see
        // `conn.rs`) and `run_in` times each big one.
        let conn_config = AsyncConnectionConfig::new().set_response_timeout(None);
        let connect_timeout = config.socket_connect_timeout;
        Ok(RedisStore {
            bulk: Connections::new(
                background.bulk_handle().clone(),
                client.clone(),
                conn_config.clone(),
                connect_timeout,
                1,
                misconfig.clone(),
                Carries::Big,
            ),
            bulk_queued: AtomicU64::new(0),
            conns: Connections::new(
                runtime,
                client,
                conn_config,
                connect_timeout,
                config.connections,
                misconfig,
                Carries::Small(config.operation_timeout()),
            ),
            op_timeout: config.operation_timeout(),
            fences: FenceScripts::new(),
        })
    }

    pub(crate) async fn connect(&self) -> Result<(), CacheError> {
        self.conns.connect_all().await?;
        self.bulk.connect_all().await
    }

    /// See [`Connections::generation`].
    pub(crate) fn generation(&self) -> u64 {
        // Either kind of connection may have reached another server.
        self.conns.generation().wrapping_add(self.bulk.generation())
    }

    /// The server's `run_id`: another one after a restart or a failover.
    pub(crate) async fn run_id(&self) -> Result<String, CacheError> {
        let text: String = self.query(redis::cmd("INFO").arg("server")).await?;
        Ok(text.lines().find_map(|l| l.strip_prefix("run_id:")).unwrap_or_default().trim().to_owned())
    }

    /// Reconnects in the background whatever is not connected.
    pub(crate) fn revive(&self) {
        self.conns.revive();
        self.bulk.revive();
    }

    /// Runs one small command under the operation timeout, poisoning its
    /// connection when the reply stream can no longer be trusted. It carries no
    /// timer: the connections' watchdog bounds it (see `conn.rs`), because a
    /// timer per command costs a Redis hit a tenth of its throughput.
    pub(crate) async fn run<T, F, Fut>(&self, command: F) -> Result<T, CacheError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        crate::background::on_runtime()?;
        let lease = self.conns.lease()?;
        let result = command(lease.conn()).await;
        result.map_err(|e| self.failed(&self.conns, &lease, e, self.op_timeout))
    }

    /// [`run`](Self::run) on the connections of `lane`. A big value's command
    /// has a timer of its own, which adds the time its bytes, and those queued
    /// ahead of them, take to move.
    pub(crate) async fn run_in<T, F, Fut>(&self, lane: Lane, command: F) -> Result<T, CacheError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let Lane::Bulk(size) = lane else { return self.run(command).await };
        crate::background::on_runtime()?;
        let queued = Queued::new(&self.bulk_queued, size as u64);
        let transfer = Duration::from_secs_f64(queued.ahead as f64 / BULK_BYTES_PER_SEC as f64);
        let timeout = self.op_timeout + transfer;
        let lease = self.bulk.lease()?;
        match tokio::time::timeout(timeout, command(lease.conn())).await {
            Ok(result) => result.map_err(|e| self.failed(&self.bulk, &lease, e, timeout)),
            Err(_) => {
                self.bulk.poison(&lease);
                Err(CacheError::Timeout(timeout))
            }
        }
    }

    /// The error of a command that failed on `lease`, poisoning the connection
    /// when it can no longer be trusted.
    fn failed(
        &self,
        conns: &Connections,
        lease: &Lease,
        e: redis::RedisError,
        timeout: Duration,
    ) -> CacheError {
        if lease.stalled() {
            return CacheError::Timeout(timeout);
        }
        let e = CacheError::from(e);
        if e.is_unavailable() {
            conns.poison(lease);
        }
        e
    }

    /// After a command failed without reaching Redis: whether the connections
    /// are back within the first reconnect attempt (at most the operation
    /// timeout), so that an idempotent command can be sent again. A driver that
    /// died with its runtime is replaced that fast; a Redis that is down is not.
    pub(crate) async fn reconnected(&self, e: &CacheError) -> bool {
        if !e.is_unavailable() || matches!(e, CacheError::Timeout(_) | CacheError::Deferred(_)) {
            return false;
        }
        self.conns.first_attempt(self.op_timeout).await
    }

    /// Reads a big value's body, `size` bytes as its pointer says.
    pub(crate) async fn get_bulk(&self, key: &str, size: usize) -> Result<Option<Vec<u8>>, CacheError> {
        let get = redis::cmd("GET").arg(key).clone();
        self.run_in(Lane::Bulk(size), |mut conn| async move { get.query_async(&mut conn).await }).await
    }

    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, CacheError> {
        self.run(|mut conn| async move { cmd.query_async(&mut conn).await }).await
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        match self.query(redis::cmd("GET").arg(key)).await {
            // A key of another Redis type was not written by a cache: it is a miss.
            Err(CacheError::Redis(e)) if e.code() == Some("WRONGTYPE") => Ok(None),
            other => other,
        }
    }

    pub(crate) async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        let n: u64 = self.query(redis::cmd("EXISTS").arg(key)).await?;
        Ok(n > 0)
    }

    /// PTTL: -2 for a missing key, -1 for one without expiry.
    pub(crate) async fn pttl(&self, key: &str) -> Result<i64, CacheError> {
        self.query(redis::cmd("PTTL").arg(key)).await
    }

    /// SCAN MATCH + UNLINK in batches. Callers fence the pattern first: a fill
    /// that read before it is refused, and one that landed earlier is found by the
    /// scan (SCAN returns every key present for the whole iteration).
    pub(crate) async fn delete_pattern(&self, pattern: &str) -> Result<u64, CacheError> {
        let mut deleted = 0;
        let unlink =
            |keys: Vec<Vec<u8>>| async move { self.query::<u64>(redis::cmd("UNLINK").arg(keys)).await };
        self.scan(pattern, unlink, &mut deleted).await?;
        Ok(deleted)
    }

    pub(crate) async fn count(&self, pattern: &str) -> Result<u64, CacheError> {
        let mut total = 0;
        self.scan(pattern, |keys| async move { Ok(keys.len() as u64) }, &mut total).await?;
        Ok(total)
    }

    /// Calls `each` with every page of keys matching `pattern`; adds up what it returns.
    /// Keys are bytes: another client may have written names that are not UTF-8.
    pub(crate) async fn scan<F, Fut>(
        &self,
        pattern: &str,
        mut each: F,
        total: &mut u64,
    ) -> Result<(), CacheError>
    where
        F: FnMut(Vec<Vec<u8>>) -> Fut,
        Fut: std::future::Future<Output = Result<u64, CacheError>>,
    {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .query(redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(BATCH))
                .await?;
            if !keys.is_empty() {
                *total += each(keys).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// One SCAN page: the next cursor and the keys.
    pub(crate) async fn scan_page(
        &self,
        pattern: &str,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<Vec<u8>>), CacheError> {
        self.query(redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(count)).await
    }

    pub(crate) async fn ping(&self) -> Result<(), CacheError> {
        self.query(&redis::cmd("PING")).await
    }

    pub(crate) async fn info(&self) -> Result<ServerInfo, CacheError> {
        let text: String = self.query(&redis::cmd("INFO")).await?;
        let mut info = ServerInfo::default();
        for line in text.lines() {
            let Some((k, v)) = line.trim_end().split_once(':') else {
                continue;
            };
            match k {
                "redis_version" => info.version = v.to_owned(),
                "used_memory" => info.used_memory = v.parse().unwrap_or(0),
                "used_memory_human" => info.used_memory_human = v.to_owned(),
                "used_memory_peak" => info.peak_memory = v.parse().unwrap_or(0),
                "used_memory_peak_human" => info.peak_memory_human = v.to_owned(),
                "connected_clients" => info.connected_clients = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        Ok(info)
    }
}

/// A big value's bytes counted as queued on the bulk connection while its
/// command runs.
struct Queued<'a> {
    counter: &'a AtomicU64,
    size: u64,
    /// Bytes queued ahead of this value, its own included.
    ahead: u64,
}

impl<'a> Queued<'a> {
    fn new(counter: &'a AtomicU64, size: u64) -> Self {
        let ahead = counter.fetch_add(size, Ordering::AcqRel) + size;
        Queued { counter, size, ahead }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.size, Ordering::AcqRel);
    }
}
