//! A Redis Cluster as the cache's Redis: redis-rs's async cluster client for
//! the commands, and what the cache needs on top of it.
//!
//! - Commands on one key (or one shard's keys, `shard.rs`) go to the slot's
//!   master over the client's multiplexed connections, following MOVED and ASK.
//! - SCAN visits every master of the current topology, read again at each
//!   scan's first page, so masters added after start are visited too.
//! - A fence only protects a fill while the master that holds it lives: a
//!   replica promoted before it copied the latest fence would let a fill
//!   that read before an invalidation put the old value back. So an
//!   invalidation is acknowledged only once a replica has it (`WAIT`), on
//!   masters that have replicas.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, FromRedisValue};

use crate::background::Background;
use crate::config::{CacheConfig, RedisTarget};
use crate::shard;
use crate::CacheError;

/// How long a topology read for `WAIT` is trusted.
const TOPOLOGY_TTL: Duration = Duration::from_secs(5);

/// Bits of a cluster SCAN cursor left for the node's own cursor; the bits
/// above are the index of the master being scanned. A node's cursor stays
/// below its hash table's size, far under 2^48.
const NODE_CURSOR_BITS: u32 = 48;

/// One master and what the cache needs to know of it.
#[derive(Debug, Clone)]
pub(crate) struct Master {
    pub(crate) host: String,
    pub(crate) port: u16,
    slots: Vec<(u16, u16)>,
    /// Replicas linked to it and not marked failing.
    replicas: usize,
}

/// The masters, sorted by address.
#[derive(Debug)]
struct Topology {
    masters: Vec<Master>,
    /// A slot is being migrated (`[slot->-id]` / `[slot-<-id]` entries).
    moving: bool,
    read: Instant,
}

impl Topology {
    /// Slots some master serves.
    fn covered(&self) -> usize {
        self.masters.iter().flat_map(|m| &m.slots).map(|&(lo, hi)| usize::from(hi - lo) + 1).sum()
    }

    /// Who serves what, to tell whether it changed.
    fn same_owners(&self, other: &Topology) -> bool {
        self.masters.len() == other.masters.len()
            && self
                .masters
                .iter()
                .zip(&other.masters)
                .all(|(a, b)| (&a.host, a.port, &a.slots) == (&b.host, b.port, &b.slots))
    }

    fn owner(&self, slot: u16) -> Option<&Master> {
        self.masters.iter().find(|m| m.slots.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot)))
    }
}

pub(crate) struct ClusterLink {
    /// Small commands: each attempt bounded by the operation timeout.
    hot: ClusterConnection,
    /// Big values: no timeout of the client's, the caller times each.
    bulk: ClusterConnection,
    /// Invalidations and their `WAIT`s, which block the connection they run on.
    fence: ClusterConnection,
    topology: ArcSwapOption<Topology>,
    op_timeout: Duration,
}

impl ClusterLink {
    /// Builds the client. Connections are made in the background, on the
    /// cache's own runtime: the first command finds out whether the cluster answers.
    pub(crate) fn new(
        config: &CacheConfig,
        target: &RedisTarget,
        background: &Background,
    ) -> Result<Self, CacheError> {
        let op_timeout = config.operation_timeout();
        let tls = Tls::of(config, target)?;
        let builder = || {
            let builder = ClusterClientBuilder::new(target.cluster_nodes().iter().map(String::as_str));
            tls.apply(builder)
                // Reconnecting to a node that died happens inside a call: it gets
                // the call's budget, not the five seconds a first connect may take.
                .connection_timeout(config.socket_connect_timeout.min(op_timeout * 2))
                // MOVED, ASK and a failover are retried within the call's budget.
                .retries(3)
                .min_retry_wait(10)
                .max_retry_wait(100)
        };
        let hot = builder()
            .response_timeout(op_timeout)
            // One redirect and its retry fit; a call never waits longer for a cache.
            .overall_response_timeout(Some(op_timeout * 2))
            .build()?;
        let bulk = builder().overall_response_timeout(None).build()?;
        let fence =
            builder().response_timeout(op_timeout).overall_response_timeout(Some(op_timeout * 2)).build()?;
        // The client's tasks live on the cache's runtime, not on a caller's.
        let _runtime = background.handle().enter();
        Ok(ClusterLink {
            hot: hot.get_pending_async_connection_with_config(timed(op_timeout)),
            bulk: bulk.get_pending_async_connection_with_config(untimed(op_timeout * 2)),
            fence: fence.get_pending_async_connection_with_config(timed(op_timeout)),
            topology: ArcSwapOption::empty(),
            op_timeout,
        })
    }

    /// Runs a command under the call's budget: the client's own timeouts
    /// bound each attempt, not the wait for a slot map being refreshed.
    pub(crate) async fn bounded<T>(
        &self,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CacheError> {
        let budget = self.op_timeout * 2;
        match tokio::time::timeout(budget, command).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(CacheError::Timeout(budget)),
        }
    }

    #[inline]
    pub(crate) fn hot(&self) -> ClusterConnection {
        self.hot.clone()
    }

    pub(crate) fn bulk(&self) -> ClusterConnection {
        self.bulk.clone()
    }

    pub(crate) fn fence(&self) -> ClusterConnection {
        self.fence.clone()
    }

    /// The masters now, read from `CLUSTER NODES`.
    async fn read_topology(&self) -> Result<Arc<Topology>, CacheError> {
        let mut conn = self.hot();
        let text: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut conn).await?;
        let (masters, moving) = parse_nodes(&text);
        let topology = Arc::new(Topology { masters, moving, read: Instant::now() });
        self.topology.store(Some(topology.clone()));
        Ok(topology)
    }

    /// The masters as last read, if recent enough; read again otherwise.
    async fn topology(&self) -> Result<Arc<Topology>, CacheError> {
        match self.topology.load_full() {
            Some(t) if t.read.elapsed() < TOPOLOGY_TTL => Ok(t),
            _ => self.read_topology().await,
        }
    }

    /// The masters now, sorted by address.
    pub(crate) async fn masters(&self) -> Result<Vec<Master>, CacheError> {
        Ok(self.read_topology().await?.masters.clone())
    }

    /// Runs `cmd` on the master at `host:port`.
    pub(crate) async fn on_node<T: FromRedisValue>(
        &self,
        master: &Master,
        cmd: Cmd,
    ) -> Result<T, CacheError> {
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: master.host.clone(),
            port: master.port,
        });
        let value = self.bounded(self.hot().route_command(cmd, route)).await?;
        from_reply(value)
    }

    /// Every key matching `pattern` on every master, page by page into `each`,
    /// complete: the scan is repeated if the slots' owners changed while it
    /// ran, and refused while a slot migrates or some slot has no master (a
    /// key could then be where no master's SCAN sees it). `restart` empties
    /// `total` before a repeat (a count); a deletion keeps what it deleted.
    pub(crate) async fn scan_all<F, Fut>(
        &self,
        pattern: &str,
        count: usize,
        mut each: F,
        total: &mut u64,
        restart: bool,
    ) -> Result<(), CacheError>
    where
        F: FnMut(Vec<Vec<u8>>) -> Fut,
        Fut: std::future::Future<Output = Result<u64, CacheError>>,
    {
        for _ in 0..3 {
            let before = self.settled_topology().await?;
            if restart {
                *total = 0;
            }
            for master in &before.masters {
                let mut cursor = 0u64;
                loop {
                    let scan = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(count)
                        .clone();
                    let (next, keys): (u64, Vec<Vec<u8>>) = self.on_node(master, scan).await?;
                    if !keys.is_empty() {
                        *total += each(keys).await?;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            if self.settled_topology().await?.same_owners(&before) {
                return Ok(());
            }
        }
        Err(CacheError::Unavailable("the cluster's slots kept moving during a scan".into()))
    }

    /// The topology now, if no slot is migrating and every slot is served.
    async fn settled_topology(&self) -> Result<Arc<Topology>, CacheError> {
        let topology = self.read_topology().await?;
        if topology.moving {
            return Err(CacheError::Unavailable("a slot is migrating: a scan could miss its keys".into()));
        }
        if topology.covered() < shard::SLOTS {
            return Err(CacheError::Unavailable(
                "some slots have no master: a scan could miss their keys".into(),
            ));
        }
        Ok(topology)
    }

    /// One page of a SCAN over every master: the cursor's high bits say which.
    pub(crate) async fn scan_page(
        &self,
        pattern: &str,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<Vec<u8>>), CacheError> {
        let masters = self.masters().await?;
        let mut node = (cursor >> NODE_CURSOR_BITS) as usize;
        let mut inner = cursor & ((1 << NODE_CURSOR_BITS) - 1);
        while let Some(master) = masters.get(node) {
            let scan =
                redis::cmd("SCAN").arg(inner).arg("MATCH").arg(pattern).arg("COUNT").arg(count).clone();
            let (next, keys): (u64, Vec<Vec<u8>>) = self.on_node(master, scan).await?;
            if next != 0 {
                return Ok(((node as u64) << NODE_CURSOR_BITS | next, keys));
            }
            node += 1;
            inner = 0;
            if !keys.is_empty() {
                let more = if node < masters.len() { (node as u64) << NODE_CURSOR_BITS } else { 0 };
                return Ok((more, keys));
            }
        }
        Ok((0, Vec::new()))
    }

    /// Returns once a replica of the master that holds `key` has every write
    /// `conn` made to it: then a failover keeps them. A master without a
    /// replica has nothing to wait for: nothing can be promoted in its place.
    pub(crate) async fn replicated(&self, conn: ClusterConnection, key: &str) -> Result<(), CacheError> {
        let slot = shard::slot(key.as_bytes());
        for fresh in [false, true] {
            let topology = if fresh { self.read_topology().await? } else { self.topology().await? };
            if topology.owner(slot).is_none_or(|m| m.replicas == 0) {
                // Nothing to wait for only if a fresh read says so: a stale one
                // may predate a replica, or miss a master one node marked failing.
                if fresh {
                    return Ok(());
                }
                continue;
            }
            if self.wait_on(conn.clone(), key, 1).await? >= 1 {
                return Ok(());
            }
            // The replica may have gone since the topology was read: read it again once.
        }
        Err(CacheError::Unavailable("no replica acknowledged the invalidation in time".into()))
    }

    /// `WAIT replicas` on the master of `key`'s slot, over `conn`: how many
    /// replicas have every write `conn` made there.
    pub(crate) async fn wait_on(
        &self,
        conn: ClusterConnection,
        key: &str,
        replicas: u64,
    ) -> Result<u64, CacheError> {
        let route = Route::new(shard::slot(key.as_bytes()), SlotAddr::Master);
        self.wait(conn, SingleNodeRoutingInfo::SpecificNode(route), replicas).await
    }

    async fn wait(
        &self,
        mut conn: ClusterConnection,
        node: SingleNodeRoutingInfo,
        replicas: u64,
    ) -> Result<u64, CacheError> {
        // Half the budget on the server: its answer comes back before the client gives up.
        let wait =
            redis::cmd("WAIT").arg(replicas).arg((self.op_timeout / 2).as_millis().max(1) as u64).clone();
        let acked = self.bounded(conn.route_command(wait, RoutingInfo::SingleNode(node))).await?;
        from_reply(acked)
    }

    /// [`replicated`](Self::replicated) on every master that has a replica.
    pub(crate) async fn replicated_everywhere(&self, conn: ClusterConnection) -> Result<(), CacheError> {
        for master in self.masters().await?.iter().filter(|m| m.replicas > 0) {
            let node = SingleNodeRoutingInfo::ByAddress { host: master.host.clone(), port: master.port };
            if self.wait(conn.clone(), node, 1).await? < 1 {
                return Err(CacheError::Unavailable(format!(
                    "no replica of {}:{} acknowledged the deletions in time",
                    master.host, master.port
                )));
            }
        }
        Ok(())
    }
}

/// A cluster error as the cache sees it: one that says the cluster is
/// changing (a slot migrating, a failover that unblocked a `WAIT`, a node
/// gone) is unavailability,
/// which opens the breaker and queues an invalidation, not an answer.
pub(crate) fn classify(e: redis::RedisError) -> CacheError {
    use redis::{ErrorKind, ServerErrorKind};
    let changing = matches!(
        e.kind(),
        ErrorKind::ClusterConnectionNotFound
            | ErrorKind::Server(
                ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
                    | ServerErrorKind::ReadOnly
            )
    ) || e.code() == Some("UNBLOCKED")
        || e.detail().is_some_and(|d| {
            // A script on a slot whose keys are moving away, mid-migration.
            d.contains("non local key") || d.contains("WAIT cannot be used with replica")
        });
    if changing {
        CacheError::Unavailable(format!("the cluster is changing: {e}"))
    } else {
        CacheError::from(e)
    }
}

/// A routed command's reply: a routed command returns the server's error
/// (NOPERM, …) as a value rather than as an error.
fn from_reply<T: FromRedisValue>(value: redis::Value) -> Result<T, CacheError> {
    let value = value.extract_error().map_err(classify)?;
    Ok(T::from_redis_value(value).map_err(redis::RedisError::from)?)
}

/// A connection config whose each attempt waits at most `timeout`: the config
/// given to the client replaces the builder's timeouts, so they are set here.
fn timed(timeout: Duration) -> redis::cluster::ClusterConfig {
    redis::cluster::ClusterConfig::new().set_response_timeout(timeout).set_connection_timeout(timeout * 2)
}

/// A connection config without a response timeout (its caller times each
/// command), connecting within `connect`.
fn untimed(connect: Duration) -> redis::cluster::ClusterConfig {
    redis::cluster::ClusterConfig::new().set_connection_timeout(connect)
}

/// How the cluster's nodes are reached: TLS when the seeds say `rediss://`.
enum Tls {
    Plain,
    #[cfg(feature = "tls")]
    Rustls {
        certs: Option<redis::TlsCertificates>,
        insecure: bool,
    },
}

impl Tls {
    fn of(config: &CacheConfig, target: &RedisTarget) -> Result<Tls, CacheError> {
        let nodes = target.cluster_nodes();
        let secure = nodes.iter().filter(|n| n.starts_with("rediss://")).count();
        let tls_settings = config.tls_ca_cert().is_some()
            || config.tls_client_cert().is_some()
            || config.tls_insecure_skip_verify();
        if secure == 0 && tls_settings {
            // Refused rather than ignored: traffic would go out in the clear.
            return Err(CacheError::config(
                "cluster_nodes",
                target,
                "TLS settings are given but the nodes are `redis://`: use `rediss://` nodes",
            ));
        }
        if secure == 0 {
            return Ok(Tls::Plain);
        }
        if secure != nodes.len() {
            return Err(CacheError::config(
                "cluster_nodes",
                target,
                "mixes `rediss://` and plain nodes: every node of a cluster is reached the same way",
            ));
        }
        #[cfg(feature = "tls")]
        return Ok(Tls::Rustls {
            certs: crate::tls::redis_certificates(config)?,
            insecure: crate::tls::skip_verify(config),
        });
        #[cfg(not(feature = "tls"))]
        {
            let _ = config;
            Err(CacheError::config(
                "cluster_nodes",
                target,
                "TLS (`rediss://`) is not in this build: enable the `tls` feature of cache-runtime",
            ))
        }
    }

    fn apply(&self, builder: ClusterClientBuilder) -> ClusterClientBuilder {
        match self {
            Tls::Plain => builder,
            #[cfg(feature = "tls")]
            Tls::Rustls { certs, insecure } => {
                let mode = if *insecure { redis::TlsMode::Insecure } else { redis::TlsMode::Secure };
                let builder = builder.tls(mode);
                match certs {
                    Some(certs) => builder.certs(certs.clone()),
                    None => builder,
                }
            }
        }
    }
}

/// The masters that serve slots, from `CLUSTER NODES`, sorted by address.
fn parse_nodes(text: &str) -> (Vec<Master>, bool) {
    struct Line<'a> {
        id: &'a str,
        addr: &'a str,
        flags: &'a str,
        master: &'a str,
        slots: Vec<(u16, u16)>,
    }
    let moving = text.lines().any(|l| l.split_whitespace().skip(8).any(|f| f.starts_with('[')));
    let lines: Vec<Line<'_>> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let slots = f[8..]
                .iter()
                // `[slot->-node]` entries are migrations, not ownership.
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(Line { id: f[0], addr: f[1], flags: f[2], master: f[3], slots })
        })
        .collect();
    // `fail?` is one node's suspicion: such a node may well be serving.
    let failing = |flags: &str| flags.split(',').any(|f| matches!(f, "fail" | "noaddr" | "handshake"));
    let mut masters: Vec<Master> = lines
        .iter()
        .filter(|l| l.flags.split(',').any(|f| f == "master") && !failing(l.flags) && !l.slots.is_empty())
        .filter_map(|l| {
            // `ip:port@cport[,hostname]`
            let addr = l.addr.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            let replicas = lines.iter().filter(|r| r.master == l.id && !failing(r.flags)).count();
            Some(Master { host: host.to_owned(), port: port.parse().ok()?, slots: l.slots.clone(), replicas })
        })
        .collect();
    masters.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    (masters, moving)
}

/// Sums what each master says of itself, for `stats()`: keys and memory add up
/// over masters; the version is the first one's.
pub(crate) fn sum_info(each: Vec<crate::store::ServerInfo>) -> crate::store::ServerInfo {
    let mut total = crate::store::ServerInfo::default();
    for info in each {
        if total.version.is_empty() {
            total.version = info.version;
        }
        total.used_memory += info.used_memory;
        total.peak_memory += info.peak_memory;
        total.connected_clients += info.connected_clients;
    }
    total.used_memory_human = human(total.used_memory);
    total.peak_memory_human = human(total.peak_memory);
    total
}

/// Bytes as Redis's `*_human` fields show them.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "K", "M", "G"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.2}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,hostname4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002,hostname2 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003,hostname3 master - 0 1426238318243 3 connected 10923-16383 [10924->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005,hostname5 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 connected
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 127.0.0.1:30006@31006,hostname6 slave,fail 292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 0 1426238317741 6 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001,hostname1 myself,master - 0 0 1 connected 0-5460
";

    #[test]
    fn masters_their_slots_and_live_replicas() {
        let (masters, moving) = parse_nodes(NODES);
        assert!(moving, "slot 10924 is migrating");
        let summary: Vec<_> = masters.iter().map(|m| (m.port, m.slots.clone(), m.replicas)).collect();
        assert_eq!(
            summary,
            vec![
                (30001, vec![(0, 5460)], 1),
                (30002, vec![(5461, 10922)], 1),
                // Its replica is failing; the migration entry is not a slot it owns.
                (30003, vec![(10923, 16383)], 0),
            ]
        );
        let topology = Topology { masters, moving, read: Instant::now() };
        assert_eq!(topology.covered(), 16384);
        assert_eq!(topology.owner(5461).map(|m| m.port), Some(30002));
    }

    #[test]
    fn summed_info_reads_like_redis() {
        let a = crate::store::ServerInfo {
            version: "7.0.15".into(),
            used_memory: 1024 * 1024,
            ..Default::default()
        };
        let b =
            crate::store::ServerInfo { used_memory: 1024 * 1024, connected_clients: 3, ..Default::default() };
        let total = sum_info(vec![a, b]);
        assert_eq!(
            (total.version.as_str(), total.used_memory, total.connected_clients),
            ("7.0.15", 2 << 20, 3)
        );
        assert_eq!(total.used_memory_human, "2.00M");
    }
}
