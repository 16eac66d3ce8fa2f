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

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, FromRedisValue, RedisFuture, Value};

use crate::background::Background;
#[cfg(feature = "cluster")]
use crate::cluster::ClusterLink;
use crate::conn::{Carries, Connections, Endpoint, Lease};

use crate::config::{CacheConfig, RedisTarget};
use crate::fence::FenceScripts;
use crate::lease::LeaseScripts;
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
    /// What advances a fence. On a cluster, a connection of its own: `WAIT`
    /// then waits for this connection's writes, and blocks no hit while it does.
    Fence,
}

/// A connection handed to one command: to one server, or to a cluster.
pub(crate) enum Conn {
    Single(MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    #[inline]
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// One server's connections.
struct Single {
    conns: Arc<Connections>,
    bulk: Arc<Connections>,
    /// Bytes of big values on their way: a big command's timeout counts those
    /// queued ahead of it on the bulk connection.
    bulk_queued: AtomicU64,
}

enum Link {
    Single(Single),
    #[cfg(feature = "cluster")]
    Cluster(ClusterLink),
}

pub(crate) struct RedisStore {
    link: Link,
    op_timeout: Duration,
    /// Shards of each prefix (`shard.rs`): 1 on one server.
    shards: u16,
    pub(crate) fences: FenceScripts,
    pub(crate) leases: LeaseScripts,
    /// Where the bus listens (`bus.rs`): the server, or each seed node of a
    /// cluster in turn (a classic PUBLISH reaches every node).
    pub(crate) listeners: Vec<Endpoint>,
    pub(crate) connect_timeout: Duration,
}

impl RedisStore {
    /// Builds the store without connecting; [`connect`](Self::connect) tries once now.
    /// Credentials refused on a reconnect go to `misconfig`.
    pub(crate) fn new(
        config: &CacheConfig,
        target: &RedisTarget,
        misconfig: Arc<Misconfig>,
        background: &Background,
    ) -> Result<Self, CacheError> {
        if !target.cluster_nodes().is_empty() {
            return Self::cluster(config, target, background);
        }
        let url = target.as_str();
        let runtime = background.handle().clone();
        let client = Endpoint::new(config, url)?;
        let listeners = vec![client.clone()];
        // No response timeout: the watchdog bounds the small commands (see
        // `conn.rs`) and `run_in` times each big one.
        let conn_config = AsyncConnectionConfig::new().set_response_timeout(None);
        let connect_timeout = config.socket_connect_timeout;
        let single = Single {
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
        };
        Ok(RedisStore {
            link: Link::Single(single),
            op_timeout: config.operation_timeout(),
            shards: 1,
            fences: FenceScripts::new(),
            leases: LeaseScripts::new(),
            listeners,
            connect_timeout,
        })
    }

    #[cfg(feature = "cluster")]
    fn cluster(
        config: &CacheConfig,
        target: &RedisTarget,
        background: &Background,
    ) -> Result<Self, CacheError> {
        let shards = config.cluster_shards;
        if !(2..=crate::shard::SLOTS as u16).contains(&shards) {
            // One shard would mean no hash tag: entries and their fence in different slots.
            return Err(CacheError::config(
                "cluster_shards",
                shards,
                "must be from 2 to 16384 on a Redis Cluster",
            ));
        }
        if config.key_prefix.contains(['{', '}']) {
            return Err(CacheError::config(
                "key_prefix",
                &config.key_prefix,
                "can't hold `{` or `}` on a Redis Cluster: they would make a hash tag of their own",
            ));
        }
        let listeners = target
            .cluster_nodes()
            .iter()
            .map(|node| {
                let url = if node.contains("://") { node.clone() } else { format!("redis://{node}") };
                Endpoint::new(config, &url)
            })
            .collect::<Result<_, _>>()?;
        Ok(RedisStore {
            link: Link::Cluster(ClusterLink::new(config, target, background)?),
            op_timeout: config.operation_timeout(),
            shards: config.cluster_shards,
            fences: FenceScripts::new(),
            leases: LeaseScripts::new(),
            listeners,
            connect_timeout: config.socket_connect_timeout,
        })
    }

    #[cfg(not(feature = "cluster"))]
    fn cluster(_: &CacheConfig, target: &RedisTarget, _: &Background) -> Result<Self, CacheError> {
        Err(CacheError::config(
            "cluster_nodes",
            target,
            "a Redis Cluster is not in this build: enable the `cluster` feature of cache-runtime",
        ))
    }

    /// Runs `WAIT 0` where `key` lives, as invalidations do on a cluster: an
    /// ACL without it is found at start. Nothing on one server.
    pub(crate) async fn probe_wait(&self, key: &str) -> Result<(), CacheError> {
        match &self.link {
            Link::Single(_) => {
                let _ = key;
                Ok(())
            }
            #[cfg(feature = "cluster")]
            Link::Cluster(c) => c.wait_on(c.fence(), key, 0).await.map(drop),
        }
    }

    /// The operation timeout every small command runs under.
    pub(crate) fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// Whether the store is a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        !matches!(self.link, Link::Single(_))
    }

    /// How many shards each prefix's entries spread over.
    pub(crate) fn shards(&self) -> u16 {
        self.shards
    }

    pub(crate) async fn connect(&self) -> Result<(), CacheError> {
        match &self.link {
            Link::Single(s) => {
                s.conns.connect_all().await?;
                s.bulk.connect_all().await
            }
            #[cfg(feature = "cluster")]
            Link::Cluster(_) => self.ping().await,
        }
    }

    /// See [`Connections::generation`]. A cluster's client reconnects on its
    /// own: its invalidations are made to survive a failover instead (`cluster.rs`).
    pub(crate) fn generation(&self) -> u64 {
        match &self.link {
            // Either kind of connection may have reached another server.
            Link::Single(s) => s.conns.generation().wrapping_add(s.bulk.generation()),
            #[cfg(feature = "cluster")]
            Link::Cluster(_) => 0,
        }
    }

    /// The server's `run_id`: another one after a restart or a failover.
    /// `None` on a cluster, whose nodes each have one.
    pub(crate) async fn run_id(&self) -> Result<Option<String>, CacheError> {
        if !matches!(self.link, Link::Single(_)) {
            return Ok(None);
        }
        let text: String = self.query(redis::cmd("INFO").arg("server")).await?;
        Ok(Some(text.lines().find_map(|l| l.strip_prefix("run_id:")).unwrap_or_default().trim().to_owned()))
    }

    /// Reconnects in the background whatever is not connected.
    pub(crate) fn revive(&self) {
        match &self.link {
            Link::Single(s) => {
                s.conns.revive();
                s.bulk.revive();
            }
            // The cluster client reconnects on its own.
            #[cfg(feature = "cluster")]
            Link::Cluster(_) => {}
        }
    }

    /// Returns once the writes made so far on `lane` to the master holding
    /// `key` would survive its failover (see `cluster.rs`); at once on one server.
    pub(crate) async fn replicated(&self, key: &str, lane: Lane) -> Result<(), CacheError> {
        match &self.link {
            Link::Single(_) => {
                let _ = (key, lane);
                Ok(())
            }
            #[cfg(feature = "cluster")]
            Link::Cluster(c) => {
                let conn = if matches!(lane, Lane::Bulk(_)) { c.bulk() } else { c.fence() };
                c.replicated(conn, key).await
            }
        }
    }

    /// Runs one small command under the operation timeout, poisoning its
    /// connection when the reply stream can no longer be trusted. It carries no
    /// timer: the connections' watchdog bounds it (see `conn.rs`), because a
    /// timer per command costs a Redis hit a tenth of its throughput.
    pub(crate) async fn run<T, F, Fut>(&self, command: F) -> Result<T, CacheError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        crate::background::on_runtime()?;
        match &self.link {
            Link::Single(s) => {
                let lease = s.conns.lease()?;
                let result = command(Conn::Single(lease.conn())).await;
                result.map_err(|e| self.failed(&s.conns, &lease, e, self.op_timeout))
            }
            // The client times each attempt and follows redirects itself; a
            // request it queues while it rediscovers the slots is timed here.
            #[cfg(feature = "cluster")]
            Link::Cluster(c) => c.bounded(command(Conn::Cluster(c.hot()))).await,
        }
    }

    /// [`run`](Self::run) on the connections of `lane`. A big value's command
    /// has a timer of its own, which adds the time its bytes, and those queued
    /// ahead of them, take to move.
    pub(crate) async fn run_in<T, F, Fut>(&self, lane: Lane, command: F) -> Result<T, CacheError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if matches!((lane, &self.link), (Lane::Hot, _) | (Lane::Fence, Link::Single(_))) {
            return self.run(command).await;
        }
        crate::background::on_runtime()?;
        match (lane, &self.link) {
            #[cfg(feature = "cluster")]
            (Lane::Fence, Link::Cluster(c)) => c.bounded(command(Conn::Cluster(c.fence()))).await,
            (Lane::Bulk(size), Link::Single(s)) => {
                let queued = Queued::new(&s.bulk_queued, size as u64);
                let timeout = self.op_timeout + transfer(queued.ahead);
                let lease = s.bulk.lease()?;
                match tokio::time::timeout(timeout, command(Conn::Single(lease.conn()))).await {
                    Ok(result) => result.map_err(|e| self.failed(&s.bulk, &lease, e, timeout)),
                    Err(_) => {
                        s.bulk.poison(&lease);
                        Err(CacheError::Timeout(timeout))
                    }
                }
            }
            // Only this value's own bytes: the cluster spreads the others over its nodes.
            #[cfg(feature = "cluster")]
            (Lane::Bulk(size), Link::Cluster(c)) => {
                let timeout = self.op_timeout + transfer(size as u64);
                match tokio::time::timeout(timeout, command(Conn::Cluster(c.bulk()))).await {
                    Ok(result) => result.map_err(crate::cluster::classify),
                    Err(_) => Err(CacheError::Timeout(timeout)),
                }
            }
            (Lane::Hot | Lane::Fence, _) => self.run(command).await,
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
        let e = conns.judge(e);
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
        match &self.link {
            Link::Single(s) => s.conns.first_attempt(self.op_timeout).await,
            #[cfg(feature = "cluster")]
            Link::Cluster(_) => false,
        }
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
    ///
    /// The deletions travel with the invalidations ([`Lane::Fence`]): on a
    /// cluster, they are on a replica of each master before this returns.
    pub(crate) async fn delete_pattern(&self, pattern: &str) -> Result<u64, CacheError> {
        let mut deleted = 0;
        let unlink = |keys: Vec<Vec<u8>>| async move {
            let unlink = redis::cmd("UNLINK").arg(keys).clone();
            let unlink = &unlink;
            self.run_in(Lane::Fence, |mut conn| async move { unlink.query_async::<u64>(&mut conn).await })
                .await
        };
        self.scan(pattern, unlink, &mut deleted, false).await?;
        #[cfg(feature = "cluster")]
        if let Link::Cluster(c) = &self.link {
            c.replicated_everywhere(c.fence()).await?;
        }
        Ok(deleted)
    }

    pub(crate) async fn count(&self, pattern: &str) -> Result<u64, CacheError> {
        let mut total = 0;
        self.scan(pattern, |keys| async move { Ok(keys.len() as u64) }, &mut total, true).await?;
        Ok(total)
    }

    /// Calls `each` with every page of keys matching `pattern`; adds up what it returns.
    /// Keys are bytes: another client may have written names that are not UTF-8.
    /// On a cluster, every master's, and all of them (see `ClusterLink::scan_all`):
    /// a repeat empties `total` first if `restart`.
    pub(crate) async fn scan<F, Fut>(
        &self,
        pattern: &str,
        mut each: F,
        total: &mut u64,
        restart: bool,
    ) -> Result<(), CacheError>
    where
        F: FnMut(Vec<Vec<u8>>) -> Fut,
        Fut: std::future::Future<Output = Result<u64, CacheError>>,
    {
        #[cfg(feature = "cluster")]
        if let Link::Cluster(c) = &self.link {
            return c.scan_all(pattern, BATCH, each, total, restart).await;
        }
        let _ = restart;
        let mut cursor = 0u64;
        loop {
            let (next, keys) = self.scan_page(pattern, cursor, BATCH).await?;
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
        match &self.link {
            Link::Single(_) => {
                self.query(redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(count))
                    .await
            }
            // Every master's keys, one master after the other.
            #[cfg(feature = "cluster")]
            Link::Cluster(c) => c.scan_page(pattern, cursor, count).await,
        }
    }

    pub(crate) async fn ping(&self) -> Result<(), CacheError> {
        self.query(&redis::cmd("PING")).await
    }

    pub(crate) async fn info(&self) -> Result<ServerInfo, CacheError> {
        match &self.link {
            Link::Single(_) => Ok(parse_info(&self.query::<String>(&redis::cmd("INFO")).await?)),
            #[cfg(feature = "cluster")]
            Link::Cluster(c) => {
                let mut each = Vec::new();
                for master in c.masters().await? {
                    each.push(parse_info(&c.on_node::<String>(&master, redis::cmd("INFO")).await?));
                }
                Ok(crate::cluster::sum_info(each))
            }
        }
    }
}

/// The fields of `INFO` that `stats()` shows.
fn parse_info(text: &str) -> ServerInfo {
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
    info
}

/// How long `bytes` take to move at the slowest rate a big value's timeout allows for.
fn transfer(bytes: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / BULK_BYTES_PER_SEC as f64)
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
