//! The key schema: where a call's entry lives, and where the cache keeps what
//! it needs beside its entries.
//!
//! Entries live under `{prefix}:`, built by [`KeyBuilder`] as
//! `{prefix}:{fn prefix}:v{wire}[.{version}]:{part}:{part}…` (parts from
//! `key.rs`), so a glob over `{prefix}:*` is every entry and nothing else.
//! Internal keys live under `{prefix}#`, which no entry glob matches:
//! `{prefix}#fence` (the fence hash, `fence.rs`), `{prefix}#tag:{tag}` (tag
//! indexes) and `{prefix}#dead:{tag}` (an index being drained). A Redis Cluster keeps keys that move together in one slot by
//! hash-tagging the part they share; this module is the one place that would
//! change for it.

use serde::Serialize;

use crate::codec;
use crate::key::{escape_glob, push_part as push, UNCACHEABLE};
use crate::spec::Spec;
use crate::Cache;

/// Where one cache's keys live.
#[derive(Debug, Clone)]
pub(crate) struct Schema {
    prefix: String,
}

impl Schema {
    pub(crate) fn new(prefix: &str) -> Self {
        Schema { prefix: prefix.to_owned() }
    }

    /// The entry of `key` (relative to the prefix).
    pub(crate) fn entry(&self, key: &str) -> String {
        let mut full = String::with_capacity(self.prefix.len() + 1 + key.len());
        full.push_str(&self.prefix);
        full.push(':');
        full.push_str(key);
        full
    }

    /// A glob over the entries: `relative` is a glob relative to the prefix.
    pub(crate) fn entries_matching(&self, relative: &str) -> String {
        format!("{}:{relative}", escape_glob(&self.prefix))
    }

    /// Every entry.
    pub(crate) fn all_entries(&self) -> String {
        self.entries_matching("*")
    }

    /// The index of `tag`'s entries.
    pub(crate) fn tag_index(&self, tag: &str) -> String {
        self.internal(&format!("tag:{tag}"))
    }

    /// Every tag index.
    pub(crate) fn all_tag_indexes(&self) -> String {
        format!("{}#tag:*", escape_glob(&self.prefix))
    }

    /// Where `tag`'s index goes while an invalidation drains it: a namespace of
    /// its own, so no tag's index is another tag's dead set.
    pub(crate) fn dead_tag_index(&self, tag: &str) -> String {
        self.internal(&format!("dead:{tag}"))
    }

    /// Every dead tag index.
    pub(crate) fn all_dead_tag_indexes(&self) -> String {
        format!("{}#dead:*", escape_glob(&self.prefix))
    }

    /// Where the bytes of the big value stored at `full` live; `full` itself
    /// holds a pointer to them (`redis_tier.rs`).
    pub(crate) fn body(&self, full: &str) -> String {
        let relative = &full[self.prefix_len().min(full.len())..];
        self.internal(&format!("body:{relative}"))
    }

    /// Every big value's body.
    pub(crate) fn all_bodies(&self) -> String {
        format!("{}#body:*", escape_glob(&self.prefix))
    }

    /// The fence hash.
    pub(crate) fn fence(&self) -> String {
        self.internal("fence")
    }

    /// An internal key of the cache's own, `{prefix}#{name}`.
    pub(crate) fn internal(&self, name: &str) -> String {
        format!("{}#{name}", self.prefix)
    }

    /// The prefix every key of this cache starts with.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many bytes of an entry's name are the prefix and its separator.
    pub(crate) fn prefix_len(&self) -> usize {
        self.prefix.len() + 1
    }
}

/// Builds a call's key: `{cache prefix}:{fn prefix}:v{wire}[.{version}]:{part}:{part}…`.
pub struct KeyBuilder {
    key: String,
    relative_start: usize,
    uncacheable: bool,
}

impl KeyBuilder {
    /// Starts the key of one call to the function `spec` describes.
    pub fn new(cache: &Cache, spec: &Spec) -> Self {
        use std::fmt::Write as _;
        let cache_prefix = &cache.config().key_prefix;
        let prefix = spec.prefix(cache);
        let mut key = String::with_capacity(cache_prefix.len() + prefix.len() + 40);
        key.push_str(cache_prefix);
        key.push(':');
        let relative_start = key.len();
        key.push_str(prefix);
        key.push_str(codec::WIRE_KEY_TAG);
        if spec.version != 0 {
            let _ = write!(key, ".{}", spec.version);
        }
        KeyBuilder { key, relative_start, uncacheable: false }
    }

    /// Appends one argument.
    pub fn arg<T: KeyArg + ?Sized>(&mut self, value: &T) {
        self.key.push(':');
        value.push_to(&mut self.key);
        self.uncacheable |= self.key.ends_with(UNCACHEABLE);
    }

    /// Starts a `key = "..."` format.
    pub fn custom(&mut self) {
        self.key.push(':');
    }

    /// Appends literal text of a `key` format.
    pub fn lit(&mut self, s: &str) {
        self.key.push_str(s);
    }

    /// Appends an interpolated value of a `key` format.
    pub fn part<T: KeyArg + ?Sized>(&mut self, value: &T) {
        value.push_to(&mut self.key);
        self.uncacheable |= self.key.ends_with(UNCACHEABLE);
    }

    /// The finished key.
    pub fn finish(self) -> Key {
        Key { full: self.key, relative_start: self.relative_start, uncacheable: self.uncacheable }
    }
}

/// A call's key, built once: the full Redis key, of which the part after the
/// cache's prefix is what the public API takes.
#[derive(Debug, Clone)]
pub struct Key {
    pub(crate) full: String,
    relative_start: usize,
    /// An argument could not be made part of it: the call bypasses the cache.
    pub(crate) uncacheable: bool,
}

impl Key {
    /// The key as [`Cache::get`] and friends take it (without the cache's prefix).
    pub fn relative(&self) -> &str {
        &self.full[self.relative_start..]
    }

    /// [`relative`](Self::relative), owned.
    pub fn into_relative(mut self) -> String {
        self.full.drain(..self.relative_start);
        self.full
    }
}

/// Appends the key-part form of `value` (escaped scalar or hash) to `out`.
pub fn push_part<T: KeyArg + ?Sized>(out: &mut String, value: &T) {
    value.push_to(out);
}

/// What can be part of a cache key: anything `Serialize`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` can't be part of a cache key: derive `Serialize` for it, or add the argument to `skip`",
    label = "not part of a key until it is `Serialize` or skipped"
)]
pub trait KeyArg {
    /// Appends the key-part form of `self` to `out`.
    fn push_to(&self, out: &mut String);
}

impl<T: Serialize + ?Sized> KeyArg for T {
    fn push_to(&self, out: &mut String) {
        push(out, self);
    }
}

impl Schema {
    /// The key of an entry named by the public API (`get_with` and friends).
    pub(crate) fn entry_key(&self, key: &str) -> Key {
        self.entry_key_with(|full| full.push_str(key))
    }

    /// The key of an entry whose name `build` appends after the prefix: the
    /// key is built in the one string that holds it.
    pub(crate) fn entry_key_with(&self, build: impl FnOnce(&mut String)) -> Key {
        let mut full = self.entry("");
        build(&mut full);
        Key { full, relative_start: self.prefix_len(), uncacheable: false }
    }
}
