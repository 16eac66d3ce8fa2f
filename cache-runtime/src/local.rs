//! The in-process tier: a bounded moka cache with the Redis tier's semantics
//! (per-entry TTL, tags, glob deletion, an invalidation epoch).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::sync::Cache as Moka;
use moka::Expiry;

use crate::glob;

#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) bytes: Arc<[u8]>,
    expires_at: Instant,
}

struct PerEntryTtl;

impl Expiry<Arc<str>, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _: &Arc<str>, entry: &Entry, now: Instant) -> Option<Duration> {
        Some(entry.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        entry: &Entry,
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

/// Keys are full keys (prefix included), as in Redis.
pub(crate) struct LocalTier {
    entries: Moka<Arc<str>, Entry>,
    // One lock orders tagged writes against tag invalidation: a tagged `set` is
    // either wholly before an invalidation (and removed by it) or wholly after.
    tags: Mutex<HashMap<String, TagSet>>,
    epoch: AtomicU64,
}

impl LocalTier {
    pub(crate) fn new(max_entries: u64) -> Self {
        LocalTier {
            entries: Moka::builder().max_capacity(max_entries).expire_after(PerEntryTtl).build(),
            tags: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<[u8]>> {
        let entry = self.entries.get(key)?;
        // moka expires lazily in housekeeping; never serve past the deadline.
        (entry.expires_at > Instant::now()).then_some(entry.bytes)
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Stores unless `expected_epoch` is given and an invalidation happened since.
    pub(crate) fn set(
        &self,
        key: &str,
        bytes: Vec<u8>,
        ttl: Duration,
        tags: &[String],
        expected_epoch: Option<u64>,
    ) -> bool {
        let entry = Entry { bytes: bytes.into(), expires_at: Instant::now() + ttl };
        let key: Arc<str> = Arc::from(key);
        // Invalidations bump the epoch while holding the tag lock, so checking it
        // under the same lock makes check-and-insert atomic against them.
        let mut index = self.tags.lock().unwrap_or_else(|e| e.into_inner());
        if expected_epoch.is_some_and(|e| e != self.epoch()) {
            return false;
        }
        self.entries.insert(key.clone(), entry);
        for tag in tags {
            let set = index.entry(tag.clone()).or_default();
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
        let _index = self.lock_and_bump();
        self.entries.remove(key).is_some_and(|e| e.expires_at > Instant::now())
    }

    /// Removes `key` if it still holds `bytes`, bumping nothing: the entry that
    /// replaces an unreadable one must not be refused.
    pub(crate) fn drop_if_same(&self, key: &str, bytes: &[u8]) {
        let _index = self.tags.lock().unwrap_or_else(|e| e.into_inner());
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
        let mut index = self.lock_and_bump();
        let mut deleted = 0;
        for tag in tags {
            if let Some(set) = index.remove(tag) {
                for key in set.members {
                    deleted += u64::from(self.remove_live(&key));
                }
            }
        }
        deleted
    }

    /// Deletes the keys matching the full-key glob `pattern`.
    pub(crate) fn delete_pattern(&self, pattern: &str) -> u64 {
        let _index = self.lock_and_bump();
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

    /// Forgets every entry.
    pub(crate) fn clear(&self) {
        let mut index = self.lock_and_bump();
        index.clear();
        self.entries.invalidate_all();
    }

    pub(crate) fn drop_tag_index(&self) {
        self.lock_and_bump().clear();
    }

    fn remove_live(&self, key: &str) -> bool {
        self.entries.remove(key).is_some_and(|e| e.expires_at > Instant::now())
    }

    fn lock_and_bump(&self) -> std::sync::MutexGuard<'_, HashMap<String, TagSet>> {
        let guard = self.tags.lock().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, Ordering::AcqRel);
        guard
    }
}
