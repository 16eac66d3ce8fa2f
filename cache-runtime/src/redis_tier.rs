//! Redis as a [`Store`]: entries, per-key fences (`fence.rs`) and tag indexes
//! under one prefix ([`Schema`]), over the commands of `redis_store.rs`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bus::Listener;
use crate::cache::KeyTtl;
use crate::fence::{Fill, Held, Observed, TagKeys, WINDOW};
use crate::glob::to_lua_pattern;
use crate::lease::{Claim, Purpose};
use crate::pending::Pending;
use crate::redis_store::{Lane, RedisStore};
use crate::schema::Schema;
use crate::seal::Sealer;
use crate::sign::Signer;
use crate::store::{BoxFuture, FillFence, KeyPage, Raw, ServerInfo, Store, Write};
use crate::CacheError;

/// What an entry holds in place of a big value: this magic (no value's header
/// starts with it), then the body's size, little-endian. The body lives under
/// [`Schema::body`], read on the bulk connection.
const POINTER: &[u8; 2] = b"\xCBB";
const POINTER_LEN: usize = POINTER.len() + 8;
/// The largest string Redis stores (`proto-max-bulk-len`'s default).
const MAX_STRING: usize = 512 << 20;

fn pointer(size: usize) -> [u8; POINTER_LEN] {
    let mut p = [0; POINTER_LEN];
    p[..2].copy_from_slice(POINTER);
    p[2..].copy_from_slice(&(size as u64).to_le_bytes());
    p
}

fn pointed_size(bytes: &[u8]) -> Option<usize> {
    if bytes.len() != POINTER_LEN || !bytes.starts_with(POINTER) {
        return None;
    }
    Some(u64::from_le_bytes(bytes[2..].try_into().ok()?) as usize)
}

/// One shard's fence (`shard.rs`): one on a single Redis.
struct Shard {
    index: u16,
    /// `schema.fence(index)`, built once: every fill names it.
    fence_key: String,
    /// The newest fence this process has seen; fills are checked against it.
    observed: Observed,
}

pub(crate) struct RedisTier {
    redis: RedisStore,
    /// Values larger than this are stored as a pointer and a body.
    big_value_bytes: usize,
    schema: Schema,
    shards: Box<[Shard]>,
    pruned_at: Mutex<Option<Instant>>,
    connect_timeout: Duration,
    /// Signs what is written and checks what is read (`sign.rs`), with `signing_key`.
    signer: Option<Signer>,
    /// Reads refused for a missing or wrong MAC.
    bad_signatures: AtomicU64,
    /// Seals the entries of sensitive prefixes and opens what is read (`seal.rs`).
    sealer: Arc<Sealer>,
    /// The connection generation whose server was checked, and that server's run_id.
    checked: AtomicU64,
    server: tokio::sync::Mutex<Option<String>>,
}

impl RedisTier {
    pub(crate) fn new(
        redis: RedisStore,
        schema: Schema,
        connect_timeout: Duration,
        big_value_bytes: usize,
        signer: Option<Signer>,
        sealer: Arc<Sealer>,
    ) -> Self {
        RedisTier {
            redis,
            big_value_bytes,
            signer,
            sealer,
            bad_signatures: AtomicU64::new(0),
            shards: (0..schema.shards())
                .map(|index| Shard { index, fence_key: schema.fence(index), observed: Observed::default() })
                .collect(),
            schema,
            pruned_at: Mutex::new(None),
            connect_timeout,
            checked: AtomicU64::new(u64::MAX),
            server: tokio::sync::Mutex::new(None),
        }
    }

    /// After a reconnect, before anything is served: a server with another
    /// run_id may have reloaded a snapshot or been promoted from a replica, so
    /// its fence counter may have gone back under the same incarnation and
    /// entries invalidated since may be back. It gets a new incarnation (every
    /// fill in flight is refused) and the prefix is cleared.
    async fn same_server(&self) -> Result<(), CacheError> {
        if self.checked_server() {
            return Ok(());
        }
        let generation = self.redis.generation();
        let mut server = self.server.lock().await;
        if self.checked.load(Ordering::Acquire) == generation {
            return Ok(());
        }
        let Some(run_id) = self.redis.run_id().await? else {
            self.checked.store(generation, Ordering::Release);
            return Ok(());
        };
        if server.as_ref().is_some_and(|known| *known != run_id) {
            tracing::warn!("Redis restarted or failed over: new fence incarnation, clearing the prefix");
            self.clear_everything().await?;
        }
        *server = Some(run_id);
        self.checked.store(generation, Ordering::Release);
        Ok(())
    }

    /// On a cluster, every instance sharing the prefix must spread it over the
    /// same shards: one that hashed a key to another shard would fence and
    /// invalidate where the other's entries are not. The first instance
    /// records its count; a later one with another count is refused.
    async fn same_shards(&self) -> Result<(), CacheError> {
        let shards = self.schema.shards();
        if shards <= 1 {
            return Ok(());
        }
        let key = self.schema.meta("shards");
        let set = redis::cmd("SET").arg(&key).arg(shards).arg("NX").arg("GET").clone();
        let recorded: Option<u16> = self.redis.query(&set).await?;
        match recorded {
            Some(other) if other != shards => Err(CacheError::config(
                "cluster_shards",
                shards,
                format!(
                    "instances already using prefix `{}` spread it over {other} shards",
                    self.schema.prefix()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Whether [`same_server`](Self::same_server) has checked the connections made so far.
    #[inline]
    fn checked_server(&self) -> bool {
        self.checked.load(Ordering::Acquire) == self.redis.generation()
    }

    /// A read whose connection failed: read again if it was replaced at once
    /// (it died with the runtime it ran on, say), from a server checked like any other.
    async fn get_again(&self, full: &str, e: CacheError) -> Result<Option<Vec<u8>>, CacheError> {
        if !self.redis.reconnected(&e).await {
            return Err(e);
        }
        self.same_server().await?;
        self.redis.get(full).await
    }

    /// The body of a big value whose pointer says it has `size` bytes.
    async fn get_body(&self, full: &str, size: usize) -> Result<Option<Raw>, CacheError> {
        // A size no Redis string can have is not a pointer this cache wrote.
        let size = size.min(MAX_STRING);
        let body_key = self.schema.body(full);
        let body = self.redis.get_bulk(&body_key, size).await?;
        // Gone with an eviction while its pointer stayed, or replaced by
        // another fill since the pointer was read: a miss.
        let body = body.filter(|b| b.len() == size).and_then(|b| self.verified(&body_key, b));
        Ok(body.and_then(|b| self.sealer.open(full, b)).map(Raw::Owned))
    }

    /// What `bytes`, read under `name`, carry: all of them unsigned, or, with
    /// a signer, what a valid MAC covers (a miss otherwise, counted).
    fn verified(&self, name: &str, bytes: Vec<u8>) -> Option<Vec<u8>> {
        let Some(signer) = &self.signer else { return Some(bytes) };
        let verified = signer.verify(name, bytes);
        if verified.is_none() {
            // Not the entry's bytes (perhaps written by someone without the secret): never in a log.
            if self.bad_signatures.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    key = name,
                    "a Redis entry without a valid signature read as a miss (counted in stats)"
                );
            } else {
                tracing::debug!(key = name, "a Redis entry without a valid signature read as a miss");
            }
        }
        verified
    }

    /// `sealed` (the entry `full`'s bytes, sealed) as Redis holds them: what
    /// the entry holds, and a big value's body apart, under `body_key`.
    /// Sealing and signing are deterministic: the same bytes store the same.
    fn stored<'b>(
        &self,
        full: &str,
        body_key: &str,
        sealed: &'b [u8],
    ) -> (Cow<'b, [u8]>, Option<Cow<'b, [u8]>>) {
        if sealed.len() <= self.big_value_bytes {
            return (self.signed(full, sealed), None);
        }
        let body = self.signed(body_key, sealed);
        // The pointer holds the body's size as stored, its MAC included.
        let pointer = self.signed(full, &pointer(body.len())).into_owned();
        (Cow::Owned(pointer), Some(body))
    }

    /// `bytes` as they are written under `name`: signed, with a signer.
    fn signed<'b>(&self, name: &str, bytes: &'b [u8]) -> Cow<'b, [u8]> {
        match &self.signer {
            Some(signer) => Cow::Owned(signer.sign(name, bytes)),
            None => Cow::Borrowed(bytes),
        }
    }

    /// The shard `full` lives in.
    #[inline]
    fn shard_of(&self, full: &str) -> &Shard {
        &self.shards[usize::from(self.schema.shard_of(full))]
    }

    /// Runs `each` on every shard at once; the sum of what they return.
    async fn every_shard<'a, F, Fut>(&'a self, each: F) -> Result<u64, CacheError>
    where
        F: Fn(&'a Shard) -> Fut,
        Fut: std::future::Future<Output = Result<u64, CacheError>>,
    {
        let all = futures_util::future::try_join_all(self.shards.iter().map(each)).await?;
        Ok(all.into_iter().sum())
    }

    /// A new incarnation of every shard's fence, then every entry deleted: what
    /// was there before can't be trusted, nor can a fill in flight.
    async fn clear_everything(&self) -> Result<u64, CacheError> {
        let fences = futures_util::future::try_join_all(self.shards.iter().map(|shard| async move {
            let fence = self.redis.fence_all(&shard.fence_key).await?;
            // Seen once a failover can't lose it: a counter a failover took back
            // would be handed out again.
            self.redis.replicated(&shard.fence_key, Lane::Fence).await?;
            shard.observed.observe(fence);
            Ok::<_, CacheError>(fence)
        }))
        .await?;
        let deleted = self.redis.delete_pattern(&self.schema.all_entries()).await?;
        self.redis.delete_pattern(&self.schema.all_tag_indexes()).await?;
        self.redis.delete_pattern(&self.schema.all_dead_tag_indexes()).await?;
        self.redis.delete_pattern(&self.schema.all_bodies()).await?;
        for (shard, fence) in self.shards.iter().zip(fences) {
            self.redis.settle(&shard.fence_key, fence.id, "new").await?;
        }
        Ok(deleted)
    }

    fn tag_indexes(&self, shard: &Shard, tags: &[String]) -> Vec<(String, String)> {
        tags.iter().map(|t| (t.clone(), self.schema.tag_index(shard.index, t))).collect()
    }

    async fn invalidate_tags(&self, tags: &[String]) -> Result<u64, CacheError> {
        self.every_shard(|shard| self.invalidate_tags_in(shard, tags)).await
    }

    async fn invalidate_tags_in(&self, shard: &Shard, tags: &[String]) -> Result<u64, CacheError> {
        let fence_key = &shard.fence_key;
        let tags: Vec<TagKeys> = tags
            .iter()
            .map(|t| TagKeys {
                tag: t.clone(),
                index: self.schema.tag_index(shard.index, t),
                dead: self.schema.dead_tag_index(shard.index, t),
            })
            .collect();
        let mut deleted = 0;
        let mut lost = None;
        let mut seen;
        loop {
            let fenced = self.redis.fence_tags(fence_key, &tags).await?;
            seen = fenced.fence;
            if fenced.lost {
                lost = Some((fenced.fence.id, fenced.token));
            }
            for &i in &fenced.drain {
                let (n, dead_lost) = self.redis.drain(fence_key, &tags[i]).await?;
                deleted += n;
                if let Some(token) = dead_lost {
                    // Evicted before it was drained: the clear below settles this loss.
                    lost = Some((fenced.fence.id, token));
                }
            }
            if !fenced.waiting {
                break;
            }
        }
        if let Some((id, token)) = lost {
            // An index is gone while entries it listed may live: only a clear of
            // every entry is sure to reach them.
            tracing::warn!(
                shard = shard.index,
                "a tag index was lost (evicted or flushed): clearing every entry of its shard"
            );
            deleted += self.redis.delete_pattern(&self.shard_entries(shard)).await?;
            self.redis.settle(fence_key, id, &token).await?;
        }
        self.redis.replicated(fence_key, Lane::Fence).await?;
        shard.observed.observe(seen);
        Ok(deleted)
    }

    /// Every entry of `shard`: every entry when there is one shard.
    fn shard_entries(&self, shard: &Shard) -> String {
        if self.shards.len() == 1 {
            self.schema.all_entries()
        } else {
            self.schema.shard_entries(shard.index)
        }
    }

    /// Learns the current fence; when entries of an earlier incarnation of it
    /// may remain unindexed (Redis restarted, was flushed, or evicted the fence),
    /// clears the prefix so that tag invalidations can find every entry again.
    async fn observe_fences(&self) -> Result<(), CacheError> {
        self.every_shard(|shard| async move { self.observe_fence(shard).await.map(|()| 0) }).await.map(drop)
    }

    async fn observe_fence(&self, shard: &Shard) -> Result<(), CacheError> {
        let fence_key = &shard.fence_key;
        let (fence, orphans) = self.redis.observe(fence_key).await?;
        shard.observed.observe(fence);
        if let Some(token) = orphans {
            let deleted = self.redis.delete_pattern(&self.shard_entries(shard)).await?;
            self.redis.settle(fence_key, fence.id, &token).await?;
            if deleted > 0 {
                tracing::info!(deleted, "entries of an earlier fence incarnation cleared");
            }
        }
        Ok(())
    }

    /// Drops fences no fill can need any more, at most once per a quarter of
    /// the fence window.
    async fn prune_fences(&self) -> Result<(), CacheError> {
        {
            let mut at = self.pruned_at.lock().unwrap_or_else(|e| e.into_inner());
            if at.is_some_and(|at| at.elapsed() < WINDOW / 4) {
                return Ok(());
            }
            *at = Some(Instant::now());
        }
        for shard in self.shards.iter() {
            let mut cursor = 0;
            loop {
                match self.redis.prune(&shard.fence_key, cursor).await? {
                    0 => break,
                    next => cursor = next,
                }
            }
        }
        Ok(())
    }
}

impl Store for RedisTier {
    fn get<'a>(&'a self, full: &'a str) -> BoxFuture<'a, Result<Option<Raw>, CacheError>> {
        // The rare paths are boxed futures of their own, so that the one boxed
        // per hit stays small.
        Box::pin(async move {
            if !self.checked_server() {
                Box::pin(self.same_server()).await?;
            }
            let bytes = match self.redis.get(full).await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => return Ok(None),
                Err(e) => match Box::pin(self.get_again(full, e)).await? {
                    Some(bytes) => bytes,
                    None => return Ok(None),
                },
            };
            let Some(bytes) = self.verified(full, bytes) else { return Ok(None) };
            match pointed_size(&bytes) {
                None => Ok(self.sealer.open(full, bytes).map(Raw::Owned)),
                Some(size) => Box::pin(self.get_body(full, size)).await,
            }
        })
    }

    #[inline]
    fn fence(&self, full: &str, now: Instant) -> FillFence {
        FillFence::Shared(self.shard_of(full).observed.get(), now)
    }

    fn write<'a>(&'a self, w: Write<'a>) -> BoxFuture<'a, Result<bool, CacheError>> {
        Box::pin(async move {
            self.same_server().await?;
            let expected = match w.expected {
                // Read from another tier (an outage fill): never written here.
                Some(FillFence::Local(..)) => return Ok(false),
                Some(f) if f.taken().elapsed() > WINDOW => return Ok(false),
                Some(FillFence::Shared(fence, _)) => Some(fence),
                None => None,
            };
            let shard = self.shard_of(w.full);
            let tags = self.tag_indexes(shard, w.tags);
            let body_key = self.schema.body(w.full);
            let sealed = self.sealer.seal(w.full, w.bytes);
            let (bytes, body) = self.stored(w.full, &body_key, &sealed);
            let read_sealed = w.replaces.map(|read| self.sealer.seal(w.full, read));
            let read = read_sealed.as_deref().map(|sealed| self.stored(w.full, &body_key, sealed));
            let replaces = read.as_ref().map(|(entry, body)| Held {
                entry,
                body_sha1: body.as_ref().map(|b| sha1_smol::Sha1::from(b).digest().to_string()),
            });
            let fill = Fill {
                entry: w.full,
                bytes: &bytes,
                body_key: &body_key,
                body: body.as_deref(),
                ttl: w.ttl,
                tags: &tags,
                expected,
                bump: w.bump,
                check_only: w.check_only,
                replaces,
            };
            let lane = crate::fence::fill_lane(&fill);
            let (stored, fence) = self.redis.fill(&shard.fence_key, fill).await?;
            if stored && w.bump {
                // A `set` fences its key: on a cluster, only once a replica has it.
                self.redis.replicated(&shard.fence_key, lane).await?;
            }
            shard.observed.observe(fence);
            Ok(stored)
        })
    }

    fn invalidate<'a>(&'a self, what: &'a Pending) -> BoxFuture<'a, Result<u64, CacheError>> {
        Box::pin(async move {
            self.same_server().await?;
            match what {
                Pending::Key(full) => {
                    let shard = self.shard_of(full);
                    let (existed, fence) =
                        self.redis.invalidate_key(&shard.fence_key, full, &self.schema.body(full)).await?;
                    self.redis.replicated(&shard.fence_key, Lane::Fence).await?;
                    shard.observed.observe(fence);
                    Ok(u64::from(existed))
                }
                Pending::Tags(tags) => self.invalidate_tags(tags).await,
                Pending::Pattern(full) => {
                    let pattern = to_lua_pattern(full.as_bytes());
                    self.every_shard(|shard| {
                        let pattern = &pattern;
                        async move {
                            let fence = self.redis.fence_pattern(&shard.fence_key, pattern).await?;
                            self.redis.replicated(&shard.fence_key, Lane::Fence).await?;
                            shard.observed.observe(fence);
                            Ok(0)
                        }
                    })
                    .await?;
                    self.redis.delete_pattern(full).await
                }
                Pending::Everything => self.clear_everything().await,
            }
        })
    }

    fn drop_if_same<'a>(&'a self, full: &'a str, bytes: &'a [u8]) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            // A big value's entry holds its pointer: that is what must still be there.
            let sealed = self.sealer.seal(full, bytes);
            let (held, _) = self.stored(full, &self.schema.body(full), &sealed);
            self.redis.drop_if_same(full, &held).await.map(drop)
        })
    }

    fn exists<'a>(&'a self, full: &'a str) -> BoxFuture<'a, Result<bool, CacheError>> {
        Box::pin(self.redis.exists(full))
    }

    fn ttl<'a>(&'a self, full: &'a str) -> BoxFuture<'a, Result<KeyTtl, CacheError>> {
        Box::pin(async move {
            Ok(match self.redis.pttl(full).await? {
                -2 => KeyTtl::Missing,
                ms if ms < 0 => KeyTtl::Persistent,
                ms => KeyTtl::Expires(Duration::from_millis(ms as u64)),
            })
        })
    }

    fn scan_page<'a>(
        &'a self,
        glob: &'a str,
        cursor: u64,
        count: usize,
    ) -> BoxFuture<'a, Result<KeyPage, CacheError>> {
        Box::pin(async move {
            let (next, keys) = self.redis.scan_page(glob, cursor, count).await?;
            Ok((keys, next))
        })
    }

    fn count<'a>(&'a self, glob: &'a str) -> BoxFuture<'a, Result<u64, CacheError>> {
        Box::pin(self.redis.count(glob))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        Box::pin(self.redis.ping())
    }

    fn server_info(&self) -> BoxFuture<'_, Result<Option<ServerInfo>, CacheError>> {
        Box::pin(async move { Ok(Some(self.redis.info().await?)) })
    }

    fn start(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        Box::pin(async move {
            let checked = tokio::time::timeout(self.connect_timeout, async {
                self.redis.connect().await?;
                self.redis.check_access(&self.schema).await
            });
            checked.await.unwrap_or(Err(CacheError::Timeout(self.connect_timeout)))?;
            self.same_shards().await?;
            self.same_server().await?;
            // Fills are checked against the newest fence seen: start from the current one.
            if let Err(e) = self.observe_fences().await {
                tracing::debug!(error = %e, "could not observe the fence");
            }
            Ok(())
        })
    }

    fn check_access(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        Box::pin(self.redis.check_access(&self.schema))
    }

    fn maintain(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let upkeep = async {
                self.observe_fences().await?;
                self.prune_fences().await
            };
            if let Err(e) = upkeep.await {
                tracing::debug!(error = %e, "fence upkeep interrupted");
            }
        })
    }

    fn revive(&self) {
        self.redis.revive();
    }

    fn publish<'a>(&'a self, channel: &'a str, message: &'a [u8]) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(self.redis.publish(channel, message))
    }

    fn redis(&self) -> Option<&RedisStore> {
        Some(&self.redis)
    }

    fn bad_signatures(&self) -> u64 {
        self.bad_signatures.load(Ordering::Relaxed)
    }

    fn listen<'a>(&'a self, channels: &'a [&'a str]) -> BoxFuture<'a, Result<Listener, CacheError>> {
        Box::pin(self.redis.listen(channels))
    }

    fn acquire_lease<'a>(
        &'a self,
        full: &'a str,
        token: &'a str,
        ttl: Duration,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<Claim, CacheError>> {
        Box::pin(async move { self.redis.acquire_lease(&self.schema.lease(full), token, ttl, purpose).await })
    }

    fn renew_lease<'a>(
        &'a self,
        full: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, CacheError>> {
        Box::pin(async move { self.redis.renew_lease(&self.schema.lease(full), token, ttl).await })
    }

    fn release_lease<'a>(
        &'a self,
        full: &'a str,
        token: &'a str,
        channel: &'a str,
        message: &'a [u8],
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(
            async move { self.redis.release_lease(&self.schema.lease(full), token, channel, message).await },
        )
    }
}
