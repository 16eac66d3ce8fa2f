//! One master, one replica and one sentinel watching them as `m`, each a
//! process of our own on a free loopback port, killed by PID on drop.
//!
//! The sentinel is quick to act: the master is down after 500 ms without an
//! answer, and the sentinel alone is the quorum, so a killed master is
//! replaced within a few seconds.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, ping, unique_prefix, Redis};

/// The name the sentinel knows the master by.
pub const MASTER_NAME: &str = "m";

pub struct SentinelSet {
    pub master: Redis,
    pub replica: Redis,
    sentinel: Sentinel,
}

struct Sentinel {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl SentinelSet {
    pub fn start() -> SentinelSet {
        let master = Redis::spawn();
        let master_port = master.port().to_string();
        let replica = Redis::spawn_with_args(&["--replicaof", "127.0.0.1", &master_port]);
        wait_until(Duration::from_secs(10), "the replica to sync", || {
            info(master.port(), "replication").contains(",state=online,")
        });
        let sentinel = Sentinel::start(master.port());
        // Found through the master's INFO, which the sentinel reads as it starts.
        wait_until(Duration::from_secs(10), "the sentinel to see the replica", || {
            query(sentinel.port, &format!("SENTINEL REPLICAS {MASTER_NAME}"))
                .contains(&replica.port().to_string())
        });
        SentinelSet { master, replica, sentinel }
    }

    /// `redis+sentinel://127.0.0.1:{sentinel}/m`.
    pub fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/{MASTER_NAME}", self.sentinel.port)
    }

    pub fn sentinel_port(&self) -> u16 {
        self.sentinel.port
    }

    /// The master's port as the sentinel gives it now.
    pub fn master_port(&self) -> u16 {
        let reply = query(self.sentinel.port, &format!("SENTINEL GET-MASTER-ADDR-BY-NAME {MASTER_NAME}"));
        // `*2 $9 127.0.0.1 $5 6379`: the last line that is a number.
        reply
            .lines()
            .rev()
            .find_map(|l| l.trim().parse::<u16>().ok())
            .unwrap_or_else(|| panic!("no master address in {reply:?}"))
    }

    /// The sentinel's log, for panic messages.
    pub fn sentinel_log(&self) -> String {
        std::fs::read_to_string(self.sentinel.dir.join("sentinel.log")).unwrap_or_default()
    }
}

impl Sentinel {
    fn start(master_port: u16) -> Sentinel {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique_prefix("sentinel"));
        std::fs::create_dir_all(&dir).expect("create a temp dir for the sentinel");
        let conf = dir.join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds {MASTER_NAME} 500\n\
             sentinel failover-timeout {MASTER_NAME} 3000\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            dir = dir.display(),
            log = dir.join("sentinel.log").display(),
        );
        std::fs::write(&conf, text).expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        let mut sentinel = Sentinel { port, dir, child: Some(child) };
        let started = Instant::now();
        while !ping(port, None) {
            let alive = sentinel.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)));
            if !alive || started.elapsed() > Duration::from_secs(10) {
                let log = std::fs::read_to_string(sentinel.dir.join("sentinel.log")).unwrap_or_default();
                panic!("the sentinel on port {port} did not start; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        sentinel
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `INFO {section}` of the server on `port`.
fn info(port: u16, section: &str) -> String {
    query(port, &format!("INFO {section}"))
}

/// One inline command's raw reply (RESP as text), read until the server
/// has been quiet for a moment.
fn query(port: u16, command: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    if stream.write_all(format!("{command}\r\n").as_bytes()).is_err() {
        return String::new();
    }
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}
