//! Redis as a [`Store`]: entries, per-key fences (`fence.rs`) and tag indexes
//! under one prefix ([`Schema`]), over the commands of `redis_store.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cache::KeyTtl;
use crate::fence::{Fill, Observed, TagKeys, WINDOW};
use crate::glob::to_lua_pattern;
use crate::pending::Pending;
use crate::redis_store::RedisStore;
use crate::schema::Schema;
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

pub(crate) struct RedisTier {
    redis: RedisStore,
    /// Values larger than this are stored as a pointer and a body.
    big_value_bytes: usize,
    schema: Schema,
    /// `schema.fence()`, built once: every fill names it.
    fence_key: String,
    /// The newest fence this process has seen; fills are checked against it.
    observed: Observed,
    pruned_at: Mutex<Option<Instant>>,
    connect_timeout: Duration,
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
    ) -> Self {
        RedisTier {
            redis,
            big_value_bytes,
            fence_key: schema.fence(),
            schema,
            observed: Observed::default(),
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
        let run_id = self.redis.run_id().await?;
        if server.as_ref().is_some_and(|known| *known != run_id) {
            tracing::warn!("Redis restarted or failed over: new fence incarnation, clearing the prefix");
            let fence_key = &self.fence_key;
            let fence = self.redis.fence_all(fence_key).await?;
            self.observed.observe(fence);
            self.redis.delete_pattern(&self.schema.all_entries()).await?;
            self.redis.settle(fence_key, fence.id, "new").await?;
        }
        *server = Some(run_id);
        self.checked.store(generation, Ordering::Release);
        Ok(())
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
        let body = self.redis.get_bulk(&self.schema.body(full), size).await?;
        // Gone with an eviction while its pointer stayed, or replaced by
        // another fill since the pointer was read: a miss.
        Ok(body.filter(|b| b.len() == size).map(Raw::Owned))
    }

    fn tag_indexes(&self, tags: &[String]) -> Vec<(String, String)> {
        tags.iter().map(|t| (t.clone(), self.schema.tag_index(t))).collect()
    }

    async fn invalidate_tags(&self, tags: &[String]) -> Result<u64, CacheError> {
        let fence_key = &self.fence_key;
        let tags: Vec<TagKeys> = tags
            .iter()
            .map(|t| TagKeys {
                tag: t.clone(),
                index: self.schema.tag_index(t),
                dead: self.schema.dead_tag_index(t),
            })
            .collect();
        let mut deleted = 0;
        let mut lost = None;
        loop {
            let fenced = self.redis.fence_tags(fence_key, &tags).await?;
            self.observed.observe(fenced.fence);
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
                "a tag index was lost (evicted or flushed): clearing every entry under the prefix"
            );
            deleted += self.redis.delete_pattern(&self.schema.all_entries()).await?;
            self.redis.settle(fence_key, id, &token).await?;
        }
        Ok(deleted)
    }

    /// Learns the current fence; when entries of an earlier incarnation of it
    /// may remain unindexed (Redis restarted, was flushed, or evicted the fence),
    /// clears the prefix so that tag invalidations can find every entry again.
    async fn observe_fence(&self) -> Result<(), CacheError> {
        let fence_key = &self.fence_key;
        let (fence, orphans) = self.redis.observe(fence_key).await?;
        self.observed.observe(fence);
        if let Some(token) = orphans {
            let deleted = self.redis.delete_pattern(&self.schema.all_entries()).await?;
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
        let mut cursor = 0;
        loop {
            match self.redis.prune(&self.fence_key, cursor).await? {
                0 => return Ok(()),
                next => cursor = next,
            }
        }
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
            match pointed_size(&bytes) {
                None => Ok(Some(Raw::Owned(bytes))),
                Some(size) => Box::pin(self.get_body(full, size)).await,
            }
        })
    }

    #[inline]
    fn fence(&self, now: Instant) -> FillFence {
        FillFence::Shared(self.observed.get(), now)
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
            let tags = self.tag_indexes(w.tags);
            let body_key = self.schema.body(w.full);
            let big = w.bytes.len() > self.big_value_bytes;
            let pointer = pointer(w.bytes.len());
            let (bytes, body) = if big { (&pointer[..], Some(w.bytes)) } else { (w.bytes, None) };
            let fill = Fill {
                entry: w.full,
                bytes,
                body_key: &body_key,
                body,
                ttl: w.ttl,
                tags: &tags,
                expected,
                bump: w.bump,
                check_only: w.check_only,
            };
            let (stored, fence) = self.redis.fill(&self.fence_key, fill).await?;
            self.observed.observe(fence);
            Ok(stored)
        })
    }

    fn invalidate<'a>(&'a self, what: &'a Pending) -> BoxFuture<'a, Result<u64, CacheError>> {
        Box::pin(async move {
            self.same_server().await?;
            let fence_key = &self.fence_key;
            match what {
                Pending::Key(full) => {
                    let (existed, fence) =
                        self.redis.invalidate_key(fence_key, full, &self.schema.body(full)).await?;
                    self.observed.observe(fence);
                    Ok(u64::from(existed))
                }
                Pending::Tags(tags) => self.invalidate_tags(tags).await,
                Pending::Pattern(full) => {
                    let fence = self.redis.fence_pattern(fence_key, &to_lua_pattern(full.as_bytes())).await?;
                    self.observed.observe(fence);
                    self.redis.delete_pattern(full).await
                }
                Pending::Everything => {
                    let fence = self.redis.fence_all(fence_key).await?;
                    self.observed.observe(fence);
                    let deleted = self.redis.delete_pattern(&self.schema.all_entries()).await?;
                    self.redis.delete_pattern(&self.schema.all_tag_indexes()).await?;
                    self.redis.delete_pattern(&self.schema.all_dead_tag_indexes()).await?;
                    self.redis.delete_pattern(&self.schema.all_bodies()).await?;
                    self.redis.settle(fence_key, fence.id, "new").await?;
                    Ok(deleted)
                }
            }
        })
    }

    fn drop_if_same<'a>(&'a self, full: &'a str, bytes: &'a [u8]) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            // A big value's entry holds its pointer: that is what must still be there.
            let pointer = pointer(bytes.len());
            let held = if bytes.len() > self.big_value_bytes { &pointer[..] } else { bytes };
            self.redis.drop_if_same(full, held).await.map(drop)
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
            self.same_server().await?;
            // Fills are checked against the newest fence seen: start from the current one.
            if let Err(e) = self.observe_fence().await {
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
                self.observe_fence().await?;
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
}
