//! The in-process tier: a bounded moka cache with the Redis tier's semantics
//! (per-entry TTL, tags, glob deletion, per-key fences).
//!
//! Fences work as in Redis (see `fence.rs`), in memory: every invalidation takes
//! the next value of a counter and stamps what it covers (a key, a tag, a
//! pattern, or everything); a fill carries the counter as it was before its read
//! and is refused only if a stamp covering its key is newer.
//!
//! An entry keeps its encoded bytes, the source of truth (`drop_if_same`
//! compares them, sizes count them), and the value they decode to, kept by the
//! first reader that could copy it: later hits of that type clone it instead
//! of decoding. It is the decoding of the entry's own bytes, never the value
//! the fill was computed from, so a local hit returns exactly what a decode
//! would.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use moka::sync::Cache as Moka;
use moka::Expiry;

use crate::cache::KeyTtl;
use crate::fence::WINDOW;
use crate::flight::Shared;
use crate::glob;
use crate::key::KeyHashing;
use crate::pending::Pending;
use crate::schema::Schema;
use crate::store::{BoxFuture, FillFence, KeyPage, Raw, ServerInfo, Store, Write};
use crate::CacheError;

/// One stored value; shared, so a hit clones one `Arc`.
pub(crate) struct Entry {
    pub(crate) bytes: Box<[u8]>,
    /// What `bytes` decode to, as the type that first read them with a copy to keep.
    pub(crate) decoded: OnceLock<Shared>,
    expires_at: Instant,
}

struct PerEntryTtl;

impl Expiry<Arc<str>, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(&self, _: &Arc<str>, entry: &Arc<Entry>, now: Instant) -> Option<Duration> {
        Some(entry.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        entry: &Arc<Entry>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.expires_at.saturating_duration_since(now))
    }
}

#[derive(Default)]
struct TagSet {
    members: HashSet<Arc<str>>,
    trim_at: usize,
}

/// When something was last invalidated.
#[derive(Clone, Copy)]
struct Stamp {
    seq: u64,
    at: Instant,
}

/// Tags and fences, behind one lock.
#[derive(Default)]
struct Index {
    tags: HashMap<String, TagSet>,
    keys: HashMap<Arc<str>, Stamp>,
    tag_fences: HashMap<String, Stamp>,
    patterns: Vec<(String, Stamp)>,
    all: u64,
    prune_at: usize,
}

impl Index {
    /// Whether something covering `key` or one of `tags` was invalidated after `seq`.
    fn fenced(&self, key: &str, tags: &[String], seq: u64) -> bool {
        self.all > seq
            || self.keys.get(key).is_some_and(|s| s.seq > seq)
            || tags.iter().any(|t| self.tag_fences.get(t).is_some_and(|s| s.seq > seq))
            || self.patterns.iter().any(|(p, s)| s.seq > seq && glob::matches(p.as_bytes(), key.as_bytes()))
    }

    /// Drops stamps no fill can need any more, amortised: when they have doubled.
    fn prune(&mut self) {
        let len = self.keys.len() + self.tag_fences.len() + self.patterns.len();
        if len < self.prune_at.max(1024) {
            return;
        }
        let live = |s: &Stamp| s.at.elapsed() < WINDOW * 2;
        self.keys.retain(|_, s| live(s));
        self.tag_fences.retain(|_, s| live(s));
        self.patterns.retain(|(_, s)| live(s));
        self.prune_at = (self.keys.len() + self.tag_fences.len() + self.patterns.len()) * 2;
    }
}

/// Keys are full keys (prefix included), as in Redis.
pub(crate) struct LocalTier {
    // xxh3 rather than SipHash: hashing the key is a tenth of a hit. The flights
    // map hashes the same keys the same way.
    entries: Moka<Arc<str>, Arc<Entry>, KeyHashing>,
    // One lock orders writes against invalidations: a tagged `set` is either
    // wholly before an invalidation (and removed by it) or wholly after, and a
    // fill's fence check and insert are one step.
    index: Mutex<Index>,
    epoch: AtomicU64,
    schema: Schema,
}

impl LocalTier {
    pub(crate) fn new(max_entries: u64, schema: Schema) -> Self {
        LocalTier {
            entries: Moka::builder()
                .max_capacity(max_entries)
                .expire_after(PerEntryTtl)
                .build_with_hasher(KeyHashing::default()),
            index: Mutex::new(Index::default()),
            epoch: AtomicU64::new(0),
            schema,
        }
    }

    /// The entry under `key` if it is alive at `now` (the caller's clock reading).
    pub(crate) fn get(&self, key: &str, now: Instant) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key)?;
        // moka expires lazily in housekeeping; never serve past the deadline.
        (entry.expires_at > now).then_some(entry)
    }

    /// Stores unless `expected_epoch` is given and something covering `key` or
    /// one of `tags` was invalidated since, or `replaces` is given and the
    /// entry holds other bytes (it was filled since that read).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn set(
        &self,
        key: &str,
        bytes: Vec<u8>,
        ttl: Duration,
        tags: &[String],
        expected_epoch: Option<u64>,
        bump: bool,
        replaces: Option<&[u8]>,
    ) -> bool {
        let entry = Arc::new(Entry {
            bytes: bytes.into(),
            decoded: OnceLock::new(),
            expires_at: Instant::now() + ttl,
        });
        let key: Arc<str> = Arc::from(key);
        let (mut index, stamp) = if bump {
            let (index, stamp) = self.stamp();
            (index, Some(stamp))
        } else {
            (self.index.lock().unwrap_or_else(|e| e.into_inner()), None)
        };
        if expected_epoch.is_some_and(|e| index.fenced(&key, tags, e)) {
            return false;
        }
        // Under the index lock, as every write of this tier: none lands between the look and the write.
        if replaces.is_some_and(|read| self.entries.get(&key).is_some_and(|held| *held.bytes != *read)) {
            return false;
        }
        if let Some(stamp) = stamp {
            index.keys.insert(key.clone(), stamp);
        }
        self.entries.insert(key.clone(), entry);
        for tag in tags {
            let set = index.tags.entry(tag.clone()).or_default();
            set.members.insert(key.clone());
            if set.members.len() > set.trim_at.max(64) {
                // Amortised trim of members whose entries expired or were evicted.
                set.members.retain(|k| self.entries.contains_key(k));
                set.trim_at = set.members.len() * 2;
            }
        }
        true
    }

    pub(crate) fn delete(&self, key: &str) -> bool {
        let (mut index, stamp) = self.stamp();
        index.keys.insert(Arc::from(key), stamp);
        self.entries.remove(key).is_some_and(|e| e.expires_at > Instant::now())
    }

    /// Removes `key` if it still holds `bytes`, bumping nothing: the entry that
    /// replaces an unreadable one must not be refused.
    pub(crate) fn drop_if_same(&self, key: &str, bytes: &[u8]) {
        let _index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if self.entries.get(key).is_some_and(|e| &*e.bytes == bytes) {
            self.entries.remove(key);
        }
    }

    pub(crate) fn remaining(&self, key: &str) -> Option<Duration> {
        let entry = self.entries.get(key)?;
        let left = entry.expires_at.checked_duration_since(Instant::now())?;
        (!left.is_zero()).then_some(left)
    }

    pub(crate) fn invalidate_tags(&self, tags: &[String]) -> u64 {
        let (mut index, stamp) = self.stamp();
        let mut deleted = 0;
        for tag in tags {
            index.tag_fences.insert(tag.clone(), stamp);
            if let Some(set) = index.tags.remove(tag) {
                for key in set.members {
                    deleted += u64::from(self.remove_live(&key));
                }
            }
        }
        deleted
    }

    /// Deletes the keys matching the full-key glob `pattern`.
    pub(crate) fn delete_pattern(&self, pattern: &str) -> u64 {
        let (mut index, stamp) = self.stamp();
        index.patterns.push((pattern.to_owned(), stamp));
        let doomed: Vec<Arc<str>> = self
            .entries
            .iter()
            .filter(|(k, _)| glob::matches(pattern.as_bytes(), k.as_bytes()))
            .map(|(k, _)| Arc::clone(&*k))
            .collect();
        doomed.iter().map(|k| u64::from(self.remove_live(k))).sum()
    }

    pub(crate) fn count(&self, pattern: &str) -> u64 {
        let now = Instant::now();
        self.entries
            .iter()
            .filter(|(k, e)| e.expires_at > now && glob::matches(pattern.as_bytes(), k.as_bytes()))
            .count() as u64
    }

    /// Live keys matching the full-key glob `pattern`.
    pub(crate) fn keys(&self, pattern: &str) -> Vec<String> {
        let now = Instant::now();
        self.entries
            .iter()
            .filter(|(k, e)| e.expires_at > now && glob::matches(pattern.as_bytes(), k.as_bytes()))
            .map(|(k, _)| k.to_string())
            .collect()
    }

    pub(crate) fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub(crate) fn size_bytes(&self) -> u64 {
        self.entries.iter().map(|(k, e)| (k.len() + e.bytes.len()) as u64).sum()
    }

    /// Applies an invalidation; how many live entries went.
    pub(crate) fn apply(&self, what: &Pending) -> u64 {
        match what {
            Pending::Key(full) => u64::from(self.delete(full)),
            Pending::Tags(tags) => self.invalidate_tags(tags),
            Pending::Pattern(full) => self.delete_pattern(full),
            Pending::Everything => {
                let deleted = self.delete_pattern(&self.schema.all_entries());
                self.drop_tag_index();
                deleted
            }
        }
    }

    /// What a fill whose read starts now is checked against.
    pub(crate) fn fence(&self, now: Instant) -> FillFence {
        FillFence::Local(self.epoch.load(Ordering::Acquire), now)
    }

    /// Stores a fill read from this tier, or a `set`.
    pub(crate) fn write_now(&self, w: Write<'_>) -> Result<bool, CacheError> {
        let expected = match w.expected {
            Some(FillFence::Shared(..)) => return Ok(false),
            Some(f) if f.taken().elapsed() > WINDOW => return Ok(false),
            Some(FillFence::Local(epoch, _)) => Some(epoch),
            None => None,
        };
        if w.check_only {
            let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            return Ok(expected.is_some_and(|e| !index.fenced(w.full, w.tags, e)));
        }
        Ok(self.set(w.full, w.bytes.to_vec(), w.ttl, w.tags, expected, w.bump, w.replaces))
    }

    /// One page of live keys matching `glob`, in key order, from `cursor` (an offset).
    pub(crate) fn scan_page_now(&self, glob: &str, cursor: u64, count: usize) -> Result<KeyPage, CacheError> {
        let mut keys = self.keys(glob);
        keys.sort_unstable();
        let start = (cursor as usize).min(keys.len());
        let end = start.saturating_add(count).min(keys.len());
        let next = if end < keys.len() { end as u64 } else { 0 };
        Ok((keys.drain(start..end).map(String::into_bytes).collect(), next))
    }

    /// Forgets every entry; every fill in flight is refused.
    pub(crate) fn clear(&self) {
        self.drop_tag_index();
        self.entries.invalidate_all();
    }

    /// Forgets the tag index; every fill in flight is refused.
    pub(crate) fn drop_tag_index(&self) {
        let (mut index, stamp) = self.stamp();
        index.tags.clear();
        index.all = stamp.seq;
    }

    fn remove_live(&self, key: &str) -> bool {
        self.entries.remove(key).is_some_and(|e| e.expires_at > Instant::now())
    }

    /// Locks the index and takes the next stamp; fills that read before it see it newer.
    fn stamp(&self) -> (std::sync::MutexGuard<'_, Index>, Stamp) {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        index.prune();
        let seq = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        (index, Stamp { seq, at: Instant::now() })
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(value))
}

impl Store for LocalTier {
    fn get<'a>(&'a self, full: &'a str) -> BoxFuture<'a, Result<Option<Raw>, CacheError>> {
        ready(Ok(LocalTier::get(self, full, Instant::now()).map(Raw::Local)))
    }

    fn fence(&self, _full: &str, now: Instant) -> FillFence {
        LocalTier::fence(self, now)
    }

    fn write<'a>(&'a self, write: Write<'a>) -> BoxFuture<'a, Result<bool, CacheError>> {
        ready(self.write_now(write))
    }

    fn invalidate<'a>(&'a self, what: &'a Pending) -> BoxFuture<'a, Result<u64, CacheError>> {
        ready(Ok(self.apply(what)))
    }

    fn drop_if_same<'a>(&'a self, full: &'a str, bytes: &'a [u8]) -> BoxFuture<'a, Result<(), CacheError>> {
        LocalTier::drop_if_same(self, full, bytes);
        ready(Ok(()))
    }

    fn exists<'a>(&'a self, full: &'a str) -> BoxFuture<'a, Result<bool, CacheError>> {
        ready(Ok(self.remaining(full).is_some()))
    }

    fn ttl<'a>(&'a self, full: &'a str) -> BoxFuture<'a, Result<KeyTtl, CacheError>> {
        ready(Ok(self.remaining(full).map_or(KeyTtl::Missing, KeyTtl::Expires)))
    }

    fn scan_page<'a>(
        &'a self,
        glob: &'a str,
        cursor: u64,
        count: usize,
    ) -> BoxFuture<'a, Result<KeyPage, CacheError>> {
        ready(self.scan_page_now(glob, cursor, count))
    }

    fn count<'a>(&'a self, glob: &'a str) -> BoxFuture<'a, Result<u64, CacheError>> {
        ready(Ok(LocalTier::count(self, glob)))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        ready(Ok(()))
    }

    fn server_info(&self) -> BoxFuture<'_, Result<Option<ServerInfo>, CacheError>> {
        ready(Ok(None))
    }
}
