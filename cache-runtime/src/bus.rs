//! The bus: what instances sharing a prefix tell each other over Redis
//! pub/sub, on one channel, `{prefix}#meta:bus`.
//!
//! Three kinds of message travel on it, never a value:
//! - an invalidation this instance applied to Redis, for the near tiers of the
//!   others (`near.rs`); fills are never announced;
//! - the release of a fleet lease that other instances wait on (`lease.rs`);
//! - an event for the handlers registered with [`Cache::on_event`](crate::Cache::on_event).
//!
//! Each instance listens on a connection of its own, RESP3, so that the
//! subscribed connection still answers the PINGs that reveal a silent
//! partition. A pooled connection (deadpool-redis) would bring nothing here:
//! the listener is one long-lived connection whose loss must be seen at once,
//! not handed back to a pool.
//!
//! Pub/sub rather than RESP3 client-side tracking: tracking tells which keys
//! changed, but a tag or pattern invalidation would then arrive as one
//! message per deleted key (thousands for a tag), fills by other instances
//! would invalidate values that were not stale, and every hit connection
//! would have to speak RESP3 with tracking on. A message per invalidation
//! carries exactly what the invalidation covered, and the near tier applies
//! it with the same fences as the local tier.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::failover::Failover;
use crate::pending::Pending;
use crate::redis_store::{Lane, RedisStore};
use crate::store::{BoxFuture, Store};
use crate::CacheError;

/// How often the listener PINGs its connection: a partition that leaves the
/// socket open is found within this and the connect timeout.
const HEARTBEAT: Duration = Duration::from_millis(500);

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
}

#[derive(Serialize, Deserialize)]
struct Message {
    /// The instance that sent it: it applied its own invalidations already.
    from: u64,
    body: Body,
}

pub(crate) struct Bus {
    channel: String,
    me: u64,
    /// Keys whose lease this instance waits on, woken by a release.
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    handlers: RwLock<HashMap<String, Vec<Handler>>>,
}

impl Bus {
    pub(crate) fn new(channel: String) -> Self {
        Bus { channel, me: instance_id(), waiters: Mutex::default(), handlers: RwLock::default() }
    }

    /// Tells the other instances that `what` was applied to Redis.
    pub(crate) async fn announce(&self, shared: &dyn Store, what: &Pending) -> Result<(), CacheError> {
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

    pub(crate) async fn emit(&self, shared: &dyn Store, event: Event) -> Result<(), CacheError> {
        shared.publish(&self.channel, &self.encode(Body::Event(event))).await
    }

    fn encode(&self, body: Body) -> Vec<u8> {
        // Plain data: it can't fail to serialize.
        serde_json::to_vec(&Message { from: self.me, body }).unwrap_or_default()
    }

    /// Registers `handler` for events named `name`.
    pub(crate) fn on_event(&self, name: &str, handler: Handler) {
        let mut handlers = self.handlers.write().unwrap_or_else(|e| e.into_inner());
        handlers.entry(name.to_owned()).or_default().push(handler);
    }

    /// Runs the handlers of `event`, each in a task of its own: a slow or
    /// panicking handler holds up neither the others nor the listener.
    pub(crate) fn dispatch(&self, event: &Event) {
        let handlers = self.handlers.read().unwrap_or_else(|e| e.into_inner());
        for handler in handlers.get(&event.name).into_iter().flatten() {
            tokio::spawn(handler(event.clone()));
        }
    }

    /// The wake-up of a lease waiter on `full`; [`forget`](Self::forget) it after.
    pub(crate) fn waiter(&self, full: &str) -> Arc<Notify> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters.entry(full.to_owned()).or_default().clone()
    }

    pub(crate) fn forget(&self, full: &str, waiter: &Arc<Notify>) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if waiters.get(full).is_some_and(|w| Arc::ptr_eq(w, waiter)) {
            waiters.remove(full);
        }
    }

    fn receive(&self, tiers: &Failover, payload: &[u8]) {
        let Ok(message) = serde_json::from_slice::<Message>(payload) else {
            tracing::debug!("a message on the cache bus that is not the cache's: ignored");
            return;
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
            Body::Event(event) => self.dispatch(&event),
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

/// A subscribed connection; its driver stops with it.
pub(crate) struct Listener {
    conn: MultiplexedConnection,
    driver: AbortHandle,
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

    /// A connection of its own subscribed to `channel`, its messages sent to
    /// `push`: to the server, or to the first node of a cluster that answers.
    pub(crate) async fn listen(
        &self,
        channel: &str,
        push: UnboundedSender<PushInfo>,
    ) -> Result<Listener, CacheError> {
        let mut failed = CacheError::Unavailable("no Redis node to listen on".into());
        for endpoint in &self.listeners {
            let (mut conn, driver) = match endpoint.open_listener(push.clone(), self.connect_timeout).await {
                Ok(opened) => opened,
                Err(e) => {
                    failed = e;
                    continue;
                }
            };
            let listener = Listener { conn: conn.clone(), driver };
            match conn.subscribe(channel).await {
                Ok(()) => return Ok(listener),
                Err(e) => failed = e.into(),
            }
        }
        Err(failed)
    }
}

/// Listens while the cache lives: applies what the bus brings, and keeps the
/// near tier serving only while subscribed. A lost connection deafens the near
/// tier at once; reconnecting backs off from 50 ms to 2 s.
pub(crate) async fn listen_loop(this: Weak<Failover>) {
    let mut backoff = Duration::from_millis(50);
    let mut refused = false;
    loop {
        let Some(tiers) = this.upgrade() else { return };
        let Some(shared) = tiers.shared_store() else { return };
        let (push, mut pushed) = unbounded_channel();
        let listener = shared.listen(tiers.bus.channel(), push).await;
        let heartbeat_timeout = tiers.heartbeat_timeout();
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
        tiers.near.listen();
        refused = false;
        tracing::debug!("cache bus: subscribed");
        drop(tiers);
        backoff = Duration::from_millis(50);
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lost = loop {
            tokio::select! {
                pushed = pushed.recv() => {
                    let Some(PushInfo { kind, data }) = pushed else { break "connection closed" };
                    match kind {
                        PushKind::Message => {
                            let Some(tiers) = this.upgrade() else { return };
                            if let Some(Value::BulkString(payload)) = data.get(1) {
                                tiers.bus.receive(&tiers, payload);
                            }
                        }
                        PushKind::Disconnection => break "connection closed",
                        _ => {}
                    }
                }
                _ = beat.tick() => {
                    if this.strong_count() == 0 {
                        return;
                    }
                    let ping = redis::cmd("PING");
                    match tokio::time::timeout(heartbeat_timeout, ping.query_async::<()>(&mut listener.conn)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break "PING failed",
                        Err(_) => break "PING not answered",
                    }
                }
            }
        };
        let Some(tiers) = this.upgrade() else { return };
        tiers.near.deafen();
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
