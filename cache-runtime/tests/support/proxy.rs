//! A TCP proxy in front of a test Redis that injects faults: added latency, a
//! black hole (bytes are swallowed, nothing answers), a partition that heals
//! (requests held, then delivered late), connection resets, and replies cut
//! off in the middle.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How the proxy treats traffic from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None = 0,
    /// Hold every reply chunk this many milliseconds (see [`Proxy::set_latency`]).
    Latency = 1,
    /// Read and drop everything; answer nothing.
    BlackHole = 2,
    /// Close every connection (new and open ones).
    Reset = 3,
    /// Forward only the first half of the next reply chunk, then close.
    CutReply = 4,
    /// Hold every request until the fault changes, then deliver them in
    /// order, also those of connections the client closed meanwhile: what
    /// TCP does for data sent into a partition that heals.
    Hold = 5,
}

pub struct Proxy {
    port: u16,
    fault: Arc<AtomicU8>,
    latency_ms: Arc<AtomicU64>,
    kick: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port forwarding to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let fault = Arc::new(AtomicU8::new(Fault::None as u8));
        let latency_ms = Arc::new(AtomicU64::new(0));
        let (kick, _) = watch::channel(0u64);
        let task = {
            let (fault, latency_ms, kick) = (fault.clone(), latency_ms.clone(), kick.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if fault.load(Ordering::SeqCst) == Fault::Reset as u8 {
                        drop(client);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, fault.clone(), latency_ms.clone(), kick.subscribe(), false));
                    tokio::spawn(pump(sr, cw, fault.clone(), latency_ms.clone(), kick.subscribe(), true));
                }
            })
        };
        Proxy { port, fault, latency_ms, kick, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn set(&self, fault: Fault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
        if fault == Fault::Reset {
            self.kick.send_modify(|n| *n += 1);
        }
    }

    pub fn set_latency(&self, latency: Duration) {
        self.latency_ms.store(latency.as_millis() as u64, Ordering::SeqCst);
        self.set(Fault::Latency);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.kick.send_modify(|n| *n += 1);
        self.fault.store(Fault::Reset as u8, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    fault: Arc<AtomicU8>,
    latency_ms: Arc<AtomicU64>,
    mut kick: watch::Receiver<u64>,
    replies: bool,
) {
    let holding = || !replies && fault.load(Ordering::SeqCst) == Fault::Hold as u8;
    let mut held: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut open = true;
    loop {
        if !held.is_empty() && !holding() {
            if to.write_all(&held).await.is_err() {
                return;
            }
            held.clear();
        }
        if !open {
            if held.is_empty() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => continue,
                _ = kick.changed() => return,
            }
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    open = false;
                    continue;
                }
                Ok(n) => n,
            },
            // Held bytes go out as soon as the hold ends.
            _ = tokio::time::sleep(Duration::from_millis(10)), if !held.is_empty() => continue,
            _ = kick.changed() => return,
        };
        match fault.load(Ordering::SeqCst) {
            _ if holding() => {
                held.extend_from_slice(&buf[..n]);
                continue;
            }
            f if f == Fault::BlackHole as u8 => continue,
            f if f == Fault::Reset as u8 => return,
            f if f == Fault::Latency as u8 && replies => {
                tokio::time::sleep(Duration::from_millis(latency_ms.load(Ordering::SeqCst))).await;
            }
            f if f == Fault::CutReply as u8 && replies => {
                let _ = to.write_all(&buf[..n.div_ceil(2)]).await;
                return;
            }
            _ => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
