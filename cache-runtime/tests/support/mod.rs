//! A real `redis-server` per test, on a free loopback port, killed on drop.
//!
//! With `REDIS_URL` set, [`Redis::start`] uses that server instead and every
//! test gets a key prefix of its own; tests that must stop or pause the server
//! always start their own with [`Redis::spawn`].

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::{Cache, CacheConfig, CacheConfigBuilder, Serialization};

pub struct Redis {
    url: String,
    port: u16,
    dir: Option<PathBuf>,
    child: Option<Child>,
    /// `requirepass`: the URL carries it, and so does the readiness check.
    password: Option<String>,
    /// More `redis-server` arguments (`--maxmemory 2mb` …).
    args: Vec<String>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A key prefix no other test in any process uses.
pub fn unique_prefix(name: &str) -> String {
    format!("t{}x{}{name}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

impl Redis {
    /// The server in `REDIS_URL`, or a fresh one of our own.
    pub fn start() -> Redis {
        match std::env::var("REDIS_URL") {
            Ok(url) if !url.is_empty() => {
                Redis { url, port: 0, dir: None, child: None, password: None, args: Vec::new() }
            }
            _ => Redis::spawn(),
        }
    }

    /// Always a fresh `redis-server` of our own, so it can be killed and restarted.
    pub fn spawn() -> Redis {
        Redis::spawn_with_password(None)
    }

    /// A fresh server of our own that requires `password` (`requirepass`).
    pub fn spawn_with_password(password: Option<&str>) -> Redis {
        Redis::spawn_with(password, &[])
    }

    /// A fresh server of our own with more `redis-server` arguments.
    pub fn spawn_with_args(args: &[&str]) -> Redis {
        Redis::spawn_with(None, args)
    }

    fn spawn_with(password: Option<&str>, args: &[&str]) -> Redis {
        Redis::spawn_on(password, args, free_port)
    }

    /// A fresh server of our own, on a port `pick` chooses.
    fn spawn_on(password: Option<&str>, args: &[&str], pick: fn() -> u16) -> Redis {
        let mut last = String::new();
        // Another process may take the free port before redis-server binds it.
        for _ in 0..5 {
            let port = pick();
            let dir = std::env::temp_dir().join(format!("cache-runtime-test-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("create a temp dir for redis-server");
            let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
            let mut redis = Redis {
                url: format!("redis://{auth}127.0.0.1:{port}/0"),
                port,
                dir: Some(dir),
                child: None,
                password: password.map(str::to_owned),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
            };
            match redis.boot() {
                Ok(()) => return redis,
                Err(e) => last = e,
            }
        }
        panic!("{last}");
    }

    fn boot(&mut self) -> Result<(), String> {
        let dir = self.dir.as_ref().expect("only our own server can be booted");
        let log = dir.join("redis.log");
        let mut command = Command::new("redis-server");
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        command.args(&self.args);
        let child = command
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("redis-server not found: install it (apt-get install redis-server) or set REDIS_URL")
            }
            Err(e) => panic!("could not start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // A PONG from a server that is not ours (the port was taken between
            // picking it and binding it) must not count: ours has to be alive.
            let alive = self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)));
            if !alive {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("redis-server on port {} exited at start; its log:\n{log}", self.port));
            }
            if ping(self.port, self.password.as_deref()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        Err(format!("redis-server on port {} did not answer PING within 10 s; its log:\n{log}", self.port))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL without credentials, for connecting as another user.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("redis://{user}:{password}@127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL and wait, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port after [`kill`](Self::kill).
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.boot() {
            panic!("{e}");
        }
    }

    /// SIGSTOP: the server keeps its sockets open and answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("only our own server can be signalled");
        let status = Command::new("kill").arg(sig).arg(child.id().to_string()).status().expect("run kill");
        assert!(status.success(), "kill {sig} failed");
    }

    /// A cache builder on this server with a prefix of the test's own.
    pub fn config(&self, name: &str) -> CacheConfigBuilder {
        CacheConfig::builder().redis_url(self.url.clone()).key_prefix(unique_prefix(name))
    }

    /// A Redis-mode cache in `format`, asserting that Redis mode was reached.
    pub async fn cache(&self, name: &str, format: Serialization) -> Cache {
        let cache = Cache::new(self.config(name).serialization(format).build().unwrap()).await.unwrap();
        assert_eq!(cache.mode(), cache_runtime::Mode::Redis, "test server unreachable at {}", self.url);
        cache
    }

    /// A plain redis-rs connection, for planting and inspecting raw keys.
    pub async fn raw(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection to the test server")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A free port whose cluster bus port (10000 above it) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn ping(port: u16, password: Option<&str>) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let request = match password {
        Some(p) => format!("AUTH {p}\r\nPING\r\n"),
        None => "PING\r\n".to_owned(),
    };
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(5).any(|w| w == b"+PONG") {
            return true;
        }
        if seen.starts_with(b"-") {
            return false;
        }
    }
    false
}

/// A local-mode cache in `format`.
pub fn local_cache(name: &str, format: Serialization) -> Cache {
    let config =
        CacheConfig::builder().key_prefix(unique_prefix(name)).serialization(format).build().unwrap();
    Cache::local(config)
}

/// The number after `name` on the command line (the examples' flags), or `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
}

pub const FORMATS: [Serialization; 3] = [Serialization::Json, Serialization::MsgPack, Serialization::Binary];

tokio::task_local! {
    /// The cache `#[cached(cache = support::current())]` functions use in the running test.
    pub static CURRENT: Cache;
}

/// The cache of the running test's scope (see [`CURRENT`]).
pub fn current() -> Cache {
    CURRENT.with(Cache::clone)
}

/// `get_with` of `key`, tagged `t`, whose body counts its runs in `runs`.
pub async fn load(cache: &Cache, key: &str, runs: &std::sync::atomic::AtomicU32) -> String {
    cache
        .get_with(key, async {
            runs.fetch_add(1, Ordering::SeqCst);
            format!("value of {key}")
        })
        .tags(["t"])
        .await
}

/// Waits until `check` holds, for at most 10 s: for what arrives
/// asynchronously (a bus message, a background warmer) on a loaded machine.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A Redis-mode and a local-mode cache, for tests that must hold in both.
pub async fn both_modes(redis: &Redis, name: &str) -> [Cache; 2] {
    [redis.cache(name, FORMATS[0]).await, local_cache(name, FORMATS[1])]
}

pub mod bench;
#[cfg(feature = "cluster")]
pub mod cluster;
#[cfg(feature = "cluster")]
pub mod cluster_load;
pub mod proxy;
#[cfg(feature = "sentinel")]
pub mod sentinel;
#[cfg(feature = "tls")]
pub mod tls;
