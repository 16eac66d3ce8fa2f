//! The bus: what instances sharing a prefix tell each other over Redis
//! pub/sub, on one channel, `{prefix}#meta:bus`.
//!
//! Three kinds of message travel on it, never a value:
//! - an invalidation this instance applied to Redis, for the near tiers of the
//!   others (`near.rs`); fills are never announced;
//! - the release of a fleet lease that other instances wait on (`lease.rs`);
//! - an event for the handlers registered with [`Cache::on_event`](crate::Cache::on_event).
//!
//! Each instance listens on a connection of its own (RESP3, opened like the
//! others: TLS, Sentinel, credentials), and sends itself a heartbeat through
//! Redis every 200 ms on a channel of its own: what proves it hears the bus is
//! that heartbeat coming back, which a dead socket, a partition that leaves
//! the socket open or a cluster node cut off from the others all stop. A
//! pooled connection (deadpool-redis) would bring nothing here: the listener
//! is one long-lived connection whose loss must be seen at once, not handed
//! back to a pool.
//!
//! Pub/sub rather than RESP3 client-side tracking: tracking tells which keys
//! changed, but a tag or pattern invalidation would then arrive as one
//! message per deleted key (thousands for a tag), fills by other instances
//! would invalidate values that were not stale, and every hit connection
//! would have to speak RESP3 with tracking on. A message per invalidation
//! carries exactly what the invalidation covered, and the near tier applies
//! it with the same fences as the local tier.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::failover::Failover;
use crate::pending::Pending;
use crate::redis_store::{Lane, RedisStore};
use crate::store::{BoxFuture, Store};
use crate::CacheError;

/// How often the listener sends itself a message through Redis: a listener
/// that stops hearing it (a dead socket, a partition that leaves the socket
/// open, a cluster node cut off from the others) is found within this and
/// the heartbeat timeout.
const HEARTBEAT: Duration = Duration::from_millis(200);

/// The messages' format: a message of another is not understood, and costs
/// the near tier what it holds (a rolling deploy that changes the format).
const VERSION: u32 = 1;

/// An event emitted with [`Cache::emit`](crate::Cache::emit) by any instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The event's name, as handlers are registered under.
    pub name: String,
    /// What the emitter attached (`null` for nothing).
    pub context: serde_json::Value,
}

type Handler = Arc<dyn Fn(Event) -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Body {
    Invalidated(Pending),
    Released(String),
    Event(Event),
    /// The listener's own heartbeat, on its own channel.
    Heartbeat(u64),
}

#[derive(Serialize, Deserialize)]
struct Message {
    v: u32,
    /// The instance that sent it: it applied its own invalidations and ran its
    /// own event handlers already.
    from: u64,
    body: Body,
}

pub(crate) struct Bus {
    channel: String,
    /// This instance's own channel, for its heartbeat.
    echo: String,
    me: u64,
    /// Off when Redis refuses PUBLISH to the cache's user (said once at start).
    enabled: AtomicBool,
    /// Keys whose lease this instance waits on, woken by a release.
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    handlers: RwLock<HashMap<String, Vec<Handler>>>,
    beats: AtomicU64,
}

impl Bus {
    pub(crate) fn new(channel: String) -> Self {
        let me = instance_id();
        Bus {
            echo: format!("{channel}:{me:x}"),
            channel,
            me,
            enabled: AtomicBool::new(true),
            waiters: Mutex::default(),
            handlers: RwLock::default(),
            beats: AtomicU64::new(0),
        }
    }

    /// Checks at start that the cache's user may publish; without it the
    /// bus is off: no near tier serves, lease waiters poll, events reach this
    /// instance only.
    pub(crate) async fn check(&self, shared: &dyn Store) -> Result<(), CacheError> {
        match shared.publish(&self.echo, &self.encode(Body::Heartbeat(0))).await {
            Err(e) if e.is_misconfiguration() => {
                self.enabled.store(false, Ordering::Release);
                tracing::error!(
                    error = %e,
                    "Redis refuses PUBLISH on the cache's channels: near tiers stay off, other instances \
                     hear nothing of this one's invalidations (see the README's ACL)"
                );
                Ok(())
            }
            other => other,
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Tells the other instances that `what` was applied to Redis.
    pub(crate) async fn announce(&self, shared: &dyn Store, what: &Pending) -> Result<(), CacheError> {
        if !self.is_enabled() {
            return Ok(());
        }
        shared.publish(&self.channel, &self.encode(Body::Invalidated(what.clone()))).await
    }

    /// The message a lease holder publishes when it lets `full` go.
    pub(crate) fn released(&self, full: &str) -> Vec<u8> {
        self.encode(Body::Released(full.to_owned()))
    }

    /// This instance's id on the bus.
    pub(crate) fn me(&self) -> u64 {
        self.me
    }

    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// Publishes `event` for the other instances; this one's handlers run
    /// from [`dispatch`](Self::dispatch), not from the bus.
    pub(crate) async fn emit(&self, shared: &dyn Store, event: Event) -> Result<(), CacheError> {
        if !self.is_enabled() {
            return Err(CacheError::Unavailable(
                "Redis refuses PUBLISH to the cache's user: the event ran this instance's handlers only"
                    .into(),
            ));
        }
        shared.publish(&self.channel, &self.encode(Body::Event(event))).await
    }

    fn encode(&self, body: Body) -> Vec<u8> {
        // Plain data: it can't fail to serialize.
        serde_json::to_vec(&Message { v: VERSION, from: self.me, body }).unwrap_or_default()
    }

    /// Registers `handler` for events named `name`.
    pub(crate) fn on_event(&self, name: &str, handler: Handler) {
        let mut handlers = self.handlers.write().unwrap_or_else(|e| e.into_inner());
        handlers.entry(name.to_owned()).or_default().push(handler);
    }

    /// Runs the handlers of `event` on `runtime` (else the current one), each
    /// in a task of its own, called there too: a handler that is slow, or
    /// panics, whether building its future or running it, holds up neither
    /// the others nor the listener.
    pub(crate) fn dispatch(&self, event: &Event, runtime: Option<&Handle>) {
        let handlers: Vec<Handler> = {
            let handlers = self.handlers.read().unwrap_or_else(|e| e.into_inner());
            handlers.get(&event.name).cloned().unwrap_or_default()
        };
        let Some(runtime) = runtime.cloned().or_else(|| Handle::try_current().ok()) else {
            tracing::warn!(event = %event.name, "no runtime to run the event's handlers on");
            return;
        };
        for handler in handlers {
            let event = event.clone();
            runtime.spawn(async move { handler(event).await });
        }
    }

    /// The wake-up of a lease waiter on `full`, registered until the guard drops.
    pub(crate) fn waiter<'a>(&'a self, full: &'a str) -> Waiter<'a> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let notify = waiters.entry(full.to_owned()).or_default().clone();
        Waiter { bus: self, full, notify }
    }

    fn receive(&self, tiers: &Failover, payload: &[u8], beat: &mut Option<(u64, Instant)>) {
        let message = match serde_json::from_slice::<Message>(payload) {
            Ok(message) if message.v == VERSION => message,
            _ => {
                // Perhaps an invalidation in a format this build can't read.
                tracing::warn!("a message on the cache bus this build can't read: the near tier starts over");
                tiers.near.clear();
                return;
            }
        };
        match message.body {
            Body::Invalidated(what) if message.from != self.me => tiers.near.apply(&what),
            Body::Invalidated(_) => {}
            Body::Released(full) => {
                let waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(waiter) = waiters.get(&full) {
                    waiter.notify_one();
                }
            }
            Body::Event(event) if message.from != self.me => self.dispatch(&event, None),
            Body::Event(_) => {}
            Body::Heartbeat(n) => {
                if beat.is_some_and(|(sent, _)| sent == n) {
                    *beat = None;
                    // The first heartbeat back proves the whole path: the near tier may serve.
                    if !tiers.near.is_listening() {
                        tiers.near.listen();
                    }
                }
            }
        }
    }
}

/// A registered lease waiter; dropping it (the wait ended, or the call was
/// dropped) removes the registration.
pub(crate) struct Waiter<'a> {
    bus: &'a Bus,
    full: &'a str,
    pub(crate) notify: Arc<Notify>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut waiters = self.bus.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if waiters.get(self.full).is_some_and(|w| Arc::ptr_eq(w, &self.notify)) {
            waiters.remove(self.full);
        }
    }
}

/// An id no other instance has, without a random number generator: the
/// process, the clock and an address of this process, hashed.
fn instance_id() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let local = 0u8;
    let seed = format!("{}:{}:{:p}", std::process::id(), nanos.as_nanos(), &local);
    xxhash_rust::xxh3::xxh3_64(seed.as_bytes())
}

/// A subscribed connection and what it receives; its driver stops with it.
pub(crate) struct Listener {
    _conn: MultiplexedConnection,
    driver: AbortHandle,
    pub(crate) pushed: UnboundedReceiver<PushInfo>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl RedisStore {
    /// Publishes on the connections of invalidations.
    pub(crate) async fn publish(&self, channel: &str, message: &[u8]) -> Result<(), CacheError> {
        let cmd = redis::cmd("PUBLISH").arg(channel).arg(message).take();
        self.run_in(Lane::Fence, |mut conn| async move { cmd.query_async::<()>(&mut conn).await }).await
    }

    /// A connection of its own subscribed to `channels`: to the server, or to
    /// the first node of a cluster that answers. Each attempt has a channel
    /// of its own, so that a failed attempt's disconnection is not mistaken
    /// for the working one's.
    pub(crate) async fn listen(&self, channels: &[&str]) -> Result<Listener, CacheError> {
        let mut failed = CacheError::Unavailable("no Redis node to listen on".into());
        for endpoint in &self.listeners {
            let (push, pushed) = unbounded_channel();
            let (mut conn, driver) = match endpoint.open_listener(push, self.connect_timeout).await {
                Ok(opened) => opened,
                Err(e) => {
                    failed = e;
                    continue;
                }
            };
            let listener = Listener { _conn: conn.clone(), driver, pushed };
            match conn.subscribe(channels).await {
                Ok(()) => return Ok(listener),
                Err(e) => failed = e.into(),
            }
        }
        Err(failed)
    }
}

/// Deafens the near tier when the listening loop ends, however it ends.
struct Deafen(Weak<Failover>);

impl Drop for Deafen {
    fn drop(&mut self) {
        if let Some(tiers) = self.0.upgrade() {
            tiers.near.deafen();
        }
    }
}

/// Listens while the cache lives: applies what the bus brings, and keeps the
/// near tier serving only while this instance provably hears the bus: its own
/// heartbeat, published like any message, came back within the timeout. A
/// lost connection or heartbeat deafens the near tier at once; reconnecting
/// backs off from 50 ms to 2 s.
pub(crate) async fn listen_loop(this: Weak<Failover>) {
    let mut backoff = Duration::from_millis(50);
    let mut refused = false;
    loop {
        let Some(tiers) = this.upgrade() else { return };
        let Some(shared) = tiers.shared_store() else { return };
        if !tiers.bus.is_enabled() {
            return;
        }
        let listener = shared.listen(&[tiers.bus.channel(), &tiers.bus.echo]).await;
        let timeout = tiers.heartbeat_timeout();
        let mut listener = match listener {
            Ok(listener) => listener,
            Err(e) => {
                // A refusal needs an operator: said once, not at every retry.
                if e.is_misconfiguration() && !refused {
                    tracing::error!(error = %e, "cache bus: Redis refuses SUBSCRIBE; near tiers stay off (see the README's ACL)");
                } else {
                    tracing::debug!(error = %e, "cache bus: not subscribed yet");
                }
                refused = e.is_misconfiguration();
                drop(tiers);
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let _deafen = Deafen(this.clone());
        refused = false;
        tracing::debug!("cache bus: subscribed");
        drop(tiers);
        backoff = Duration::from_millis(50);
        let mut beat: Option<(u64, Instant)> = None;
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lost = loop {
            tokio::select! {
                pushed = listener.pushed.recv() => {
                    let Some(PushInfo { kind, data }) = pushed else { break "connection closed" };
                    match kind {
                        PushKind::Message => {
                            let Some(tiers) = this.upgrade() else { return };
                            if let Some(Value::BulkString(payload)) = data.get(1) {
                                tiers.bus.receive(&tiers, payload, &mut beat);
                            }
                        }
                        PushKind::Disconnection => break "connection closed",
                        _ => {}
                    }
                }
                _ = tick.tick() => {
                    let Some(tiers) = this.upgrade() else { return };
                    match beat {
                        Some((_, sent)) if sent.elapsed() > timeout => break "heartbeat not heard",
                        Some(_) => {}
                        None => {
                            let n = tiers.bus.beats.fetch_add(1, Ordering::Relaxed) + 1;
                            beat = Some((n, Instant::now()));
                            // Published by a task of its own, so that messages keep being applied meanwhile.
                            tokio::spawn(async move {
                                if let Some(shared) = tiers.shared_store() {
                                    let message = tiers.bus.encode(Body::Heartbeat(n));
                                    let _ = shared.publish(&tiers.bus.echo, &message).await;
                                }
                            });
                        }
                    }
                }
            }
        };
        tracing::info!(
            cause = lost,
            "cache bus: listener lost; the near tier serves again once resubscribed"
        );
    }
}

/// `d`, give or take a quarter, so that instances don't reconnect in step.
pub(crate) fn jittered(d: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let spread = d.as_micros() as u64 / 2;
    let offset = if spread == 0 { 0 } else { u64::from(nanos) % spread };
    d - d / 4 + Duration::from_micros(offset)
}
