//! The key schema: where a call's entry lives, and where the cache keeps what
//! it needs beside its entries.
//!
//! Entries live under `{prefix}:`, built by [`KeyBuilder`] as
//! `{prefix}:{fn prefix}:v{wire}[.{version}]:{part}:{part}…` (parts from
//! `key.rs`), so a glob over `{prefix}:*` is every entry and nothing else.
//! Internal keys live under `{prefix}#`, which no entry glob matches:
//! `{prefix}#fence` (the fence hash, `fence.rs`), `{prefix}#tag:{tag}` (tag
//! indexes) and `{prefix}#dead:{tag}` (an index being drained). On a Redis
//! Cluster each of these carries its shard's hash tag after the prefix
//! (`shard.rs`), so that what a script touches shares one slot.

use serde::Serialize;

use crate::codec;
use crate::key::{escape_glob, push_part as push, UNCACHEABLE};
use crate::shard;
use crate::spec::Spec;
use crate::Cache;

/// Where one cache's keys live.
#[derive(Debug, Clone)]
pub(crate) struct Schema {
    prefix: String,
    /// 1 on a single Redis: no shard tags at all (see `shard.rs`).
    shards: u16,
}

impl Schema {
    pub(crate) fn new(prefix: &str, shards: u16) -> Self {
        Schema { prefix: prefix.to_owned(), shards: shards.max(1) }
    }

    /// How many shards the keys are spread over (1: not sharded).
    pub(crate) fn shards(&self) -> u16 {
        self.shards
    }

    fn sharded(&self) -> bool {
        self.shards > 1
    }

    /// The bytes a shard tag takes after the prefix (0 when not sharded).
    fn tag_len(&self) -> usize {
        if self.sharded() {
            shard::TAG_LEN
        } else {
            0
        }
    }

    /// The entry of `key` (relative to the prefix).
    pub(crate) fn entry(&self, key: &str) -> String {
        self.entry_key(key).full
    }

    /// The shard of an entry.
    #[inline]
    pub(crate) fn shard_of(&self, full: &str) -> u16 {
        shard::of(self.shards, self.relative(full).as_bytes())
    }

    /// An entry's key without the prefix and shard tag: what the public API takes.
    pub(crate) fn relative<'a>(&self, full: &'a str) -> &'a str {
        full.get(self.prefix_len()..).unwrap_or_default()
    }

    /// A glob over the entries: `relative` is a glob relative to the prefix.
    pub(crate) fn entries_matching(&self, relative: &str) -> String {
        // A shard tag is always four characters: `?` matches each exactly.
        let any_tag = if self.sharded() { "{????}" } else { "" };
        format!("{}:{any_tag}{relative}", escape_glob(&self.prefix))
    }

    /// Every entry.
    pub(crate) fn all_entries(&self) -> String {
        self.entries_matching("*")
    }

    /// Every entry of one shard.
    pub(crate) fn shard_entries(&self, shard: u16) -> String {
        format!("{}:{}*", escape_glob(&self.prefix), self.tag(shard))
    }

    /// The index of `tag`'s entries in `shard`.
    pub(crate) fn tag_index(&self, shard: u16, tag: &str) -> String {
        self.internal(shard, &format!("tag:{tag}"))
    }

    /// Every tag index.
    pub(crate) fn all_tag_indexes(&self) -> String {
        self.all_internal("tag:*")
    }

    /// Where `tag`'s index in `shard` goes while an invalidation drains it: a
    /// namespace of its own, so no tag's index is another tag's dead set.
    pub(crate) fn dead_tag_index(&self, shard: u16, tag: &str) -> String {
        self.internal(shard, &format!("dead:{tag}"))
    }

    /// Every dead tag index.
    pub(crate) fn all_dead_tag_indexes(&self) -> String {
        self.all_internal("dead:*")
    }

    /// Where the bytes of the big value stored at `full` live; `full` itself
    /// holds a pointer to them (`redis_tier.rs`). In the entry's shard.
    pub(crate) fn body(&self, full: &str) -> String {
        self.internal(self.shard_of(full), &format!("body:{}", self.relative(full)))
    }

    /// Every big value's body.
    pub(crate) fn all_bodies(&self) -> String {
        self.all_internal("body:*")
    }

    /// The fleet lease on the entry `full` (`lease.rs`), in the entry's shard.
    pub(crate) fn lease(&self, full: &str) -> crate::lease::LeaseKeys {
        let (shard, relative) = (self.shard_of(full), self.relative(full));
        crate::lease::LeaseKeys {
            held: self.internal(shard, &format!("lease:{relative}")),
            waited: self.internal(shard, &format!("waited:{relative}")),
            entry: full.to_owned(),
        }
    }

    /// The fence hash of `shard`.
    pub(crate) fn fence(&self, shard: u16) -> String {
        self.internal(shard, "fence")
    }

    /// An internal key of the cache's own in `shard`, `{prefix}#[{tag}]{name}`.
    pub(crate) fn internal(&self, shard: u16, name: &str) -> String {
        format!("{}#{}{name}", self.prefix, self.tag(shard))
    }

    /// A key about the whole prefix, in no shard: `{prefix}#meta:{name}`.
    pub(crate) fn meta(&self, name: &str) -> String {
        format!("{}#meta:{name}", self.prefix)
    }

    /// A key of the write-behind queue, `{prefix}#wb:{{prefix}}:{name}`: the
    /// prefix, which can't hold braces on a cluster, as the hash tag puts every
    /// key of the queue in one slot, as its scripts need.
    pub(crate) fn write_behind(&self, name: &str) -> String {
        format!("{prefix}#wb:{{{prefix}}}:{name}", prefix = self.prefix)
    }

    /// A glob over internal keys of every shard; `name` is a glob.
    fn all_internal(&self, name: &str) -> String {
        let any_tag = if self.sharded() { "{????}" } else { "" };
        format!("{}#{any_tag}{name}", escape_glob(&self.prefix))
    }

    /// A shard's tag as text ("" when not sharded).
    fn tag(&self, shard: u16) -> String {
        if !self.sharded() {
            return String::new();
        }
        shard::tag(self.shards, shard).iter().map(|&b| b as char).collect()
    }

    /// The prefix every key of this cache starts with.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many bytes of an entry's name are the prefix, its separator and the
    /// shard tag.
    pub(crate) fn prefix_len(&self) -> usize {
        self.prefix.len() + 1 + self.tag_len()
    }
}

/// Writes the shard tag of the entry `full` into the placeholder at `at`: the
/// tag depends on the key after it, known only once the key is built.
fn set_tag(full: &mut String, at: usize, shards: u16) {
    let relative = &full.as_bytes()[at + shard::TAG_LEN..];
    let tag = shard::tag(shards, shard::of(shards, relative));
    // ASCII over ASCII of the same length: the string stays UTF-8.
    full.replace_range(at..at + shard::TAG_LEN, std::str::from_utf8(&tag).unwrap_or("{0000}"));
}

/// Room for a shard tag, written by [`set_tag`] once the key is built.
const TAG_PLACEHOLDER: &str = "{----}";

/// Builds a call's key: `{cache prefix}:{fn prefix}:v{wire}[.{version}]:{part}:{part}…`.
pub struct KeyBuilder {
    key: String,
    relative_start: usize,
    uncacheable: bool,
    /// Shards of a cluster (1: none, and no tag is written).
    shards: u16,
}

impl KeyBuilder {
    /// Starts the key of one call to the function `spec` describes.
    pub fn new(cache: &Cache, spec: &Spec) -> Self {
        use std::fmt::Write as _;
        let cache_prefix = &cache.config().key_prefix;
        let prefix = spec.prefix(cache);
        let shards = cache.inner.schema.shards;
        let mut key = String::with_capacity(cache_prefix.len() + prefix.len() + 46);
        key.push_str(cache_prefix);
        key.push(':');
        if shards > 1 {
            key.push_str(TAG_PLACEHOLDER);
        }
        let relative_start = key.len();
        key.push_str(prefix);
        key.push_str(codec::WIRE_KEY_TAG);
        if spec.version != 0 {
            let _ = write!(key, ".{}", spec.version);
        }
        // A sensitive function whose entries can't be encrypted bypasses the cache.
        let uncacheable = spec.sensitive && !cache.inner.sealer.register(prefix);
        KeyBuilder { key, relative_start, uncacheable, shards }
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
    pub fn finish(mut self) -> Key {
        if self.shards > 1 {
            set_tag(&mut self.key, self.relative_start - shard::TAG_LEN, self.shards);
        }
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
        let mut full = String::with_capacity(self.prefix_len() + 40);
        full.push_str(&self.prefix);
        full.push(':');
        if self.sharded() {
            full.push_str(TAG_PLACEHOLDER);
        }
        build(&mut full);
        if self.sharded() {
            set_tag(&mut full, self.prefix.len() + 1, self.shards);
        }
        Key { full, relative_start: self.prefix_len(), uncacheable: false }
    }
}
