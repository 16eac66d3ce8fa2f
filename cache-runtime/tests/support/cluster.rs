//! A real Redis Cluster per test: `redis-server --cluster-enabled yes` on free
//! loopback ports, joined with `redis-cli --cluster create`, stopped by PID.
//!
//! With `REDIS_CLUSTER_NODES` set, [`Cluster::start`] uses that cluster instead
//! (every test has a key prefix of its own); tests that fail nodes over or move
//! slots always start their own with [`Cluster::spawn`].

use std::process::Command;
use std::time::{Duration, Instant};

use cache_runtime::{Cache, CacheConfig, CacheConfigBuilder, Mode};

use super::{free_cluster_port, unique_prefix, Redis};

/// Seconds a node may be unreachable before the cluster fails it over.
const NODE_TIMEOUT_MS: &str = "1000";

/// What every node of ours runs with.
const NODE_ARGS: [&str; 8] = [
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    NODE_TIMEOUT_MS,
    // A master that loses its last replica keeps serving its slots.
    "--cluster-require-full-coverage",
    "no",
];

pub struct Cluster {
    /// Our own nodes (empty for an existing cluster).
    nodes: Vec<Redis>,
    seeds: Vec<String>,
}

/// One node as `CLUSTER NODES` shows it.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// The id of its master, for a replica.
    pub master_id: Option<String>,
    pub slots: Vec<(u16, u16)>,
}

impl Cluster {
    /// The cluster in `REDIS_CLUSTER_NODES`, or 3 masters with a replica each of our own.
    pub fn start() -> Cluster {
        match std::env::var("REDIS_CLUSTER_NODES") {
            Ok(nodes) if !nodes.trim().is_empty() => Cluster {
                nodes: Vec::new(),
                seeds: nodes.split(',').map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect(),
            },
            _ => Cluster::spawn(3, 1),
        }
    }

    /// A fresh cluster of our own: `masters` masters with `replicas` replicas each.
    pub fn spawn(masters: usize, replicas: usize) -> Cluster {
        let nodes: Vec<Redis> = (0..masters * (1 + replicas))
            .map(|_| Redis::spawn_on(None, &NODE_ARGS, free_cluster_port))
            .collect();
        let seeds: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        Cluster::create(nodes, seeds, replicas, &[])
    }

    /// A fresh cluster of `masters` masters whose clients, cluster bus and
    /// replication all speak TLS (`--tls-cluster yes`), with certificates made
    /// for it; the seeds are `rediss://` URLs. Our tooling keeps the plain ports.
    pub fn spawn_tls(masters: usize) -> (Cluster, super::tls::Certs) {
        let certs = super::tls::Certs::generate();
        let ca = certs.ca_pem().display().to_string();
        let mut seeds = Vec::new();
        let nodes = (0..masters)
            .map(|_| {
                // The cluster bus listens 10000 above the TLS port.
                let tls_port = free_cluster_port();
                let tls = certs.server_args(tls_port, "node", "no");
                let mut args: Vec<&str> = NODE_ARGS.to_vec();
                args.extend(tls.iter().map(String::as_str));
                args.extend(["--tls-cluster", "yes"]);
                seeds.push(format!("127.0.0.1:{tls_port}"));
                Redis::spawn_on(None, &args, free_cluster_port)
            })
            .collect();
        let cluster = Cluster::create(nodes, seeds, 0, &["--tls", "--cacert", &ca]);
        let seeds = cluster.seeds.iter().map(|s| format!("rediss://{s}")).collect();
        (Cluster { seeds, ..cluster }, certs)
    }

    /// Joins `nodes` into a cluster through `seeds` (their client addresses).
    fn create(nodes: Vec<Redis>, seeds: Vec<String>, replicas: usize, cli_args: &[&str]) -> Cluster {
        let masters = nodes.len() / (1 + replicas);
        // redis-cli waits for the nodes to join for as long as it takes: bounded here.
        let out = Command::new("timeout")
            .arg("60")
            .arg("redis-cli")
            .args(cli_args)
            .arg("--cluster")
            .arg("create")
            .args(&seeds)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| {
                panic!("redis-cli not found ({e}): install redis-tools (apt-get install redis-server)")
            });
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let known = nodes.len();
        let cluster = Cluster { nodes, seeds };
        cluster.wait_until_settled(masters, known);
        cluster
    }

    /// Waits until every node of ours says the cluster is ok, knows all of its
    /// nodes, and agrees on which `masters` serve slots.
    pub fn wait_until_settled(&self, masters: usize, known: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let settled = self.live_ports().iter().all(|&port| {
                let info = cli(port, &["CLUSTER", "INFO"]);
                let nodes = parse_nodes(&cli(port, &["CLUSTER", "NODES"]));
                let synced = nodes.iter().find(|n| n.port == port).is_none_or(|me| {
                    // A replica counts once its first sync is done: before, WAIT gets no ack.
                    me.master || {
                        let repl = cli(port, &["INFO", "replication"]);
                        repl.contains("master_link_status:up") && repl.contains("master_sync_in_progress:0")
                    }
                });
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{known}"))
                    && nodes.iter().filter(|n| n.master && !n.slots.is_empty()).count() == masters
                    && synced
            });
            if settled {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not settle within 30 s:\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes.iter().filter(|n| n.is_running()).map(Redis::port).collect()
    }

    /// `CLUSTER NODES` as a node of ours sees it.
    pub fn describe(&self) -> String {
        self.live_ports().first().map(|&p| cli(p, &["CLUSTER", "NODES"])).unwrap_or_default()
    }

    /// The seed nodes, `host:port`.
    pub fn seeds(&self) -> &[String] {
        &self.seeds
    }

    /// The nodes as a live node of ours sees them.
    pub fn topology(&self) -> Vec<Node> {
        let port = *self.live_ports().first().expect("a live node");
        parse_nodes(&cli(port, &["CLUSTER", "NODES"]))
    }

    /// The master serving `slot` now.
    pub fn master_of(&self, slot: u16) -> Node {
        self.topology()
            .into_iter()
            .find(|n| n.master && n.slots.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot)))
            .unwrap_or_else(|| panic!("no master serves slot {slot}:\n{}", self.describe()))
    }

    /// A replica of `master`.
    pub fn replica_of(&self, master: &Node) -> Node {
        self.topology()
            .into_iter()
            .find(|n| n.master_id.as_deref() == Some(master.id.as_str()))
            .unwrap_or_else(|| panic!("{} has no replica:\n{}", master.port, self.describe()))
    }

    /// A cache builder on this cluster with a prefix of the test's own.
    pub fn config(&self, name: &str) -> CacheConfigBuilder {
        CacheConfig::builder().redis_cluster(self.seeds.clone()).key_prefix(unique_prefix(name))
    }

    /// A Redis-mode cache on the cluster, asserting that Redis mode was reached.
    pub async fn cache(&self, name: &str) -> Cache {
        let cache = Cache::new(self.config(name).build().unwrap()).await.unwrap();
        assert_eq!(cache.mode(), Mode::Redis, "cluster unreachable at {:?}", self.seeds);
        cache
    }

    /// A plain redis-rs cluster connection, for inspecting raw keys.
    pub async fn raw(&self) -> redis::cluster_async::ClusterConnection {
        let nodes: Vec<String> = self.seeds.iter().map(|s| format!("redis://{s}")).collect();
        redis::cluster::ClusterClient::new(nodes)
            .unwrap()
            .get_async_connection()
            .await
            .expect("raw connection to the test cluster")
    }

    /// A manual failover of `master` to a replica of it (`CLUSTER FAILOVER`):
    /// the replica catches up first, then takes over. Returns the new master.
    pub fn fail_over(&self, master: &Node) -> Node {
        let replica = self.replica_of(master);
        let reply = cli(replica.port, &["CLUSTER", "FAILOVER"]);
        assert!(reply.trim() == "OK", "CLUSTER FAILOVER on {}: {reply}", replica.port);
        self.wait_for_master(&replica);
        replica
    }

    /// SIGKILL of the node on `port`, as a crash.
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port() == port).expect("a node of ours");
        node.kill();
    }

    /// Waits until every live node sees `node` as a master.
    pub fn wait_for_master(&self, node: &Node) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let everywhere = self.live_ports().iter().all(|&port| {
                parse_nodes(&cli(port, &["CLUSTER", "NODES"])).iter().any(|n| n.id == node.id && n.master)
            });
            if everywhere {
                return;
            }
            assert!(Instant::now() < deadline, "{} did not become master:\n{}", node.port, self.describe());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts one more node and joins it to the cluster as a master without
    /// slots (`redis-cli --cluster add-node`); returns it once every node knows it.
    pub fn add_master(&mut self) -> Node {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            NODE_TIMEOUT_MS,
        ];
        let node = Redis::spawn_on(None, &args, free_cluster_port);
        let port = node.port();
        let seed = self.live_ports()[0];
        let out = Command::new("redis-cli")
            .args(["--cluster", "add-node", &format!("127.0.0.1:{port}"), &format!("127.0.0.1:{seed}")])
            .output()
            .expect("run redis-cli");
        assert!(out.status.success(), "add-node failed:\n{}", String::from_utf8_lossy(&out.stdout));
        self.nodes.push(node);
        let known = self.nodes.len();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let everywhere = self.live_ports().iter().all(|&p| {
                let info = cli(p, &["CLUSTER", "INFO"]);
                info.contains(&format!("cluster_known_nodes:{known}"))
                    && info.contains("cluster_state:ok")
                    && parse_nodes(&cli(p, &["CLUSTER", "NODES"])).iter().any(|n| n.port == port && n.master)
            });
            if everywhere {
                break;
            }
            assert!(Instant::now() < deadline, "node {port} did not join:\n{}", self.describe());
            std::thread::sleep(Duration::from_millis(50));
        }
        self.topology().into_iter().find(|n| n.port == port).expect("the new node")
    }

    /// Moves `slot` and its keys from its master to `to`, the way
    /// `redis-cli --cluster reshard` does: clients see ASK while keys move and
    /// MOVED after.
    pub fn migrate(&self, slot: u16, to: &Node) {
        let from = self.master_of(slot);
        assert_ne!(from.id, to.id, "slot {slot} is already on {}", to.port);
        let slot_arg = slot.to_string();
        cli_ok(to.port, &["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from.id]);
        cli_ok(from.port, &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to.id]);
        loop {
            let keys = cli(from.port, &["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100"]);
            let keys: Vec<&str> = keys.lines().map(str::trim).filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "REPLACE", "KEYS"];
            args.extend(keys.iter().copied());
            cli_ok(from.port, &args);
        }
        for node in self.topology().iter().filter(|n| n.master) {
            cli_ok(node.port, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to.id]);
        }
    }
}

impl Redis {
    /// Whether our server process is up (not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// Runs `redis-cli -p port args…` and returns its output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cli_ok(port: u16, args: &[&str]) {
    let reply = cli(port, args);
    assert!(reply.trim() == "OK" || reply.trim() == "NOKEY", "{args:?} on {port}: {reply}");
}

fn parse_nodes(text: &str) -> Vec<Node> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let port = f[1].split(['@', ',']).next()?.rsplit_once(':')?.1.parse().ok()?;
            let flags: Vec<&str> = f[2].split(',').collect();
            if flags.iter().any(|f| matches!(*f, "fail" | "fail?" | "noaddr")) {
                return None;
            }
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(Node {
                id: f[0].to_owned(),
                port,
                master: flags.contains(&"master"),
                master_id: (f[3] != "-").then(|| f[3].to_owned()),
                slots,
            })
        })
        .collect()
}
