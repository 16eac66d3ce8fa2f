//! The fleet lease: one body run per cold key across every instance sharing
//! Redis, as single flight (`flight.rs`) gives one per process.
//!
//! A process's flight leader, before running the body, takes a lease on the key
//! in Redis (`SET NX PX`, in the key's shard). If another instance holds it,
//! the leader marks the key as waited on and waits for the holder's release
//! message on the bus (`bus.rs`), reading Redis again when woken and, as a
//! fallback for a lost message, every ~100 ms. The holder renews its lease
//! while the body runs and releases it once the fill is written; a holder that
//! died stops renewing, its lease expires after `fleet_lease_ttl`, and a
//! waiter takes it over. No caller waits on one holder longer than twice
//! `fleet_lease_ttl` (a holder that renewed just before dying leaves a whole
//! lease behind): past it, the waiter runs the body itself. A result that
//! is not stored (an `Err`, a `None`) wakes the waiters, and one of them runs
//! the body next: once at a time across the fleet, never as a herd.
//!
//! The lease decides who runs the body, never whether its result is stored:
//! the fill is checked against the fence as any other (`fence.rs`), so a fill
//! made under a lease that outlived an invalidation is refused. A waiter that
//! takes over reads again under a fence taken just before that read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::Script;
use tokio::task::AbortHandle;

use crate::bus::jittered;
use crate::redis_store::{Lane, RedisStore};
use crate::store::{FillFence, Raw};
use crate::{Cache, CacheError};

/// How often a waiter reads Redis again if no release message wakes it.
const POLL: Duration = Duration::from_millis(100);

// The entry is checked first: a caller whose read missed just before
// another instance's fill and release must not run the body again. A
// fail-safe entry past its logical expiry (its stamp: a 0xCE or 0xCF byte,
// then the expiry in little-endian milliseconds; ARGV[3] is now) is not a fill.
// An early refresh (ARGV[4] is 1) replaces a live entry and waits for nobody:
// it skips the check and asks for no wake-up.
const ACQUIRE: &str = r"
local refresh = ARGV[4] == '1'
if not refresh then
  local head = redis.call('GETRANGE', KEYS[3], 0, 8)
  if #head == 9 and (string.byte(head, 1) == 206 or string.byte(head, 1) == 207) then
    local at = 0
    for i = 9, 2, -1 do at = at * 256 + string.byte(head, i) end
    if at > tonumber(ARGV[3]) then return 2 end
  elseif #head > 0 then
    return 2
  end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if not refresh then redis.call('SET', KEYS[2], '1', 'PX', ARGV[2]) end
return redis.call('GET', KEYS[1]) or ''
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
";

// The release message goes out only if someone waits: a lease nobody
// contended costs no message.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
-- pcall: a user refused PUBLISH has no bus, and its waiters poll.
if redis.call('DEL', KEYS[2]) == 1 then redis.pcall('PUBLISH', ARGV[2], ARGV[3]) end
return 1
";

pub(crate) struct LeaseScripts {
    acquire: Script,
    renew: Script,
    release: Script,
}

impl LeaseScripts {
    pub(crate) fn new() -> Self {
        LeaseScripts {
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        }
    }
}

/// The keys of one lease: held, waited on, and the entry it is for. All in the entry's shard.
pub(crate) struct LeaseKeys {
    pub(crate) held: String,
    pub(crate) waited: String,
    pub(crate) entry: String,
}

/// What a lease is taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Filling a missing or expired entry: a live entry means someone filled it.
    Fill,
    /// Replacing a live entry before it expires (early refresh).
    Refresh,
}

/// What a try for a lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    /// This call holds it.
    Won,
    /// The entry exists: someone filled it since this call's read.
    Filled,
    /// Another call holds it: its token.
    Held(String),
}

impl RedisStore {
    pub(crate) async fn acquire_lease(
        &self,
        keys: &LeaseKeys,
        token: &str,
        ttl: Duration,
        purpose: Purpose,
    ) -> Result<Claim, CacheError> {
        let mut call = self.leases.acquire.key(&keys.held);
        call.key(&keys.waited).key(&keys.entry).arg(token).arg(millis(ttl)).arg(crate::codec::now_ms());
        call.arg(u8::from(purpose == Purpose::Refresh));
        let got: redis::Value =
            self.run_in(Lane::Hot, |mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        Ok(match got {
            redis::Value::Int(1) => Claim::Won,
            redis::Value::Int(_) => Claim::Filled,
            other => Claim::Held(redis::from_redis_value(other).unwrap_or_default()),
        })
    }

    pub(crate) async fn renew_lease(
        &self,
        keys: &LeaseKeys,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        let mut call = self.leases.renew.key(&keys.held);
        call.key(&keys.waited).arg(token).arg(millis(ttl));
        let renewed: u8 =
            self.run_in(Lane::Hot, |mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        Ok(renewed == 1)
    }

    pub(crate) async fn release_lease(
        &self,
        keys: &LeaseKeys,
        token: &str,
        channel: &str,
        message: &[u8],
    ) -> Result<(), CacheError> {
        let mut call = self.leases.release.key(&keys.held);
        call.key(&keys.waited).arg(token).arg(channel).arg(message);
        self.run_in(Lane::Hot, |mut conn| async move { call.invoke_async::<u8>(&mut conn).await }).await?;
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

/// Whose turn it is to run the body.
pub(crate) enum Turn {
    /// This call's, holding the lease, or without one (none configured, or
    /// Redis could not be asked, or the wait ran out).
    Run(Option<Held>),
    /// Another instance filled the key meanwhile: this is what a read found,
    /// and when that read began.
    Found(Raw, Instant),
}

/// Waits for this call's turn to run the body of `full` across the fleet.
/// `fence` is moved up to each new read. One holder is waited on for at most
/// two leases' time: a dead one's lease has expired by then and a live one is
/// too slow to wait for; a new holder (one that took over) is waited on anew.
pub(crate) async fn turn(cache: &Cache, full: &str, fence: &mut FillFence) -> Turn {
    let tiers = &cache.inner.tiers;
    let ttl = cache.config().fleet_lease_ttl();
    // Registered before the first try, so that a release between a refused
    // try and the wait still wakes it.
    let waiter = tiers.bus.waiter(full);
    let token = next_token(tiers.bus.me());
    let (mut holder, mut since) = (String::new(), Instant::now());
    let mut unreadable = 0;
    loop {
        match tiers.acquire_lease(full, &token, ttl, Purpose::Fill).await {
            Ok(Claim::Won) => return Turn::Run(Some(Held::new(cache, full, token, ttl))),
            Ok(Claim::Held(other)) if other != holder => (holder, since) = (other, Instant::now()),
            Ok(Claim::Held(_)) => {}
            Ok(Claim::Filled) => {
                let now = Instant::now();
                *fence = cache.fill_fence(full, now);
                match cache.read(full, now).await {
                    Ok(Some(raw)) if !crate::fail_safe::expired(&raw) => return Turn::Found(raw, now),
                    // The entry exists but reads as a miss (a big value whose body
                    // was evicted, an entry of another shape, a fail-safe big
                    // value past its expiry): nobody will fill it while it
                    // lives, so this call runs the body.
                    Ok(_) if unreadable > 0 => return Turn::Run(None),
                    // Gone again (an invalidation, an expiry): wait, then try again.
                    Ok(_) => unreadable += 1,
                    Err(_) => return Turn::Run(None),
                }
            }
            Err(_) => return Turn::Run(None),
        }
        // Twice the lease: a holder that renewed just before it died leaves a
        // whole lease behind it, which a waiter must outlast to take over.
        let left = (ttl * 2).saturating_sub(since.elapsed());
        if left.is_zero() {
            tracing::debug!(key = full, "fleet lease: its holder kept it a lease's time; running the body");
            return Turn::Run(None);
        }
        tokio::select! {
            _ = waiter.notify.notified() => {}
            _ = tokio::time::sleep(jittered(POLL).min(left)) => {}
        }
        let now = Instant::now();
        *fence = cache.fill_fence(full, now);
        match cache.read(full, now).await {
            // A fail-safe entry past its expiry is what the holder is replacing: wait on.
            Ok(Some(raw)) if !crate::fail_safe::expired(&raw) => return Turn::Found(raw, now),
            Ok(_) => {}
            Err(_) => return Turn::Run(None),
        }
    }
}

/// The lease on `full` for an early refresh, if nobody holds it: a refresh
/// never waits, since a live entry serves meanwhile.
pub(crate) async fn try_take(cache: &Cache, full: &str) -> Option<Held> {
    let ttl = cache.config().fleet_lease_ttl();
    let token = next_token(cache.inner.tiers.bus.me());
    match cache.inner.tiers.acquire_lease(full, &token, ttl, Purpose::Refresh).await {
        Ok(Claim::Won) => Some(Held::new(cache, full, token, ttl)),
        Ok(_) | Err(_) => None,
    }
}

fn next_token(me: u64) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{me:x}:{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A lease this call holds: renewed while it lives, released in the
/// background when dropped (after the fill, or when the call is dropped or its body panics).
pub(crate) struct Held {
    cache: Cache,
    full: String,
    token: String,
    renewal: Option<AbortHandle>,
}

impl Held {
    fn new(cache: &Cache, full: &str, token: String, ttl: Duration) -> Self {
        let renewal = cache.runtime().map(|runtime| {
            let (cache, full, token) = (cache.clone(), full.to_owned(), token.clone());
            let renew = async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    match cache.inner.tiers.renew_lease(&full, &token, ttl).await {
                        Ok(true) => {}
                        // Lost (expired, or the key's master failed over): the fence still guards the fill.
                        Ok(false) | Err(_) => return,
                    }
                }
            };
            runtime.spawn(renew).abort_handle()
        });
        Held { cache: cache.clone(), full: full.to_owned(), token, renewal }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
        // Let the others go now rather than after the lease's time.
        let (cache, full, token) =
            (self.cache.clone(), std::mem::take(&mut self.full), std::mem::take(&mut self.token));
        if let Some(runtime) = cache.runtime().cloned() {
            runtime.spawn(async move {
                let _ = cache.inner.tiers.release_lease(&full, &token).await;
            });
        }
    }
}
