//! Per-key fences in Redis: a fill of key K lands only if nothing covering K
//! (K itself, one of its tags, a pattern matching it, `clear`) was invalidated
//! after the fill's read began.
//!
//! The race is the one of memcache's leases (Nishtala et al., NSDI '13, 3.2.1)
//! and FusionCache's #613/#625: a caller misses, computes from the database,
//! an update and its invalidation land meanwhile, and the caller's write then
//! puts the old value back for a whole TTL. Leases close it with a token the
//! miss creates; here the miss must stay a plain GET (the hit path is one GET),
//! so the token is taken before the read instead, from what the process last
//! saw of one hash per prefix, `{prefix}#fence`:
//!
//! - `id`: the incarnation, a random 64-bit nonce, and `seq`, a counter. Every
//!   invalidation takes the next `seq` and records it on what it covers
//!   (`k:<key>`, `t:<tag>`, a pattern list, or a new incarnation for `clear`).
//! - A fill carries the `(id, seq)` the process had seen before its read. It is
//!   refused if the hash's `id` differs, or if a fence on its key, its tags or a
//!   matching pattern is newer than its `seq`. Other keys' fences don't matter,
//!   so invalidating some keys never refuses the fills of others.
//!
//! Nothing that can disappear turns into a stale read. A restart, a FLUSHALL or
//! the eviction of the hash takes every fence at once, and with them the `id`:
//! the next incarnation has another nonce, so every fill in flight is refused,
//! never matched against a counter that started again. When an invalidation
//! can't record its fence (OOM under `noeviction` refuses the write), it deletes
//! the hash instead, which DEL may do under OOM, with the same effect. Fences
//! are needed only while a fill could be in flight: a fill older than [`WINDOW`]
//! is refused by the client, and fences older than twice that are pruned.
//!
//! Tag indexes (`{prefix}#tag:<tag>`, sorted sets of entry keys) can be evicted
//! on their own. A tagged fill also notes the tag in the hash (`r:<tag>`, until
//! its entries expire), so a tag invalidation that finds the index gone while
//! the note lives, or while entries of an earlier incarnation may remain
//! (`orphans`), knows members may be unreachable and clears the whole prefix
//! instead: a lost index costs misses, never a stale read. Big tags are drained
//! in batches: the fence script renames the index to `…:dead` atomically, so
//! fills after it start a fresh index, and the dead one is emptied 500 entries
//! per script.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use redis::Script;

use crate::redis_store::{Lane, RedisStore};
use crate::CacheError;

/// How long a fill may take from its read to its write before it is refused.
pub(crate) const WINDOW: Duration = Duration::from_secs(120);

/// Entries per script when a tag's index is drained.
const DRAIN_BATCH: usize = 500;

/// What a process last saw of the fence hash: the incarnation and its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Fence {
    pub(crate) id: u64,
    pub(crate) seq: u64,
}

/// The newest fence a process has seen; fills started now are checked against it.
/// Read before every Redis read, so lock-free: the pair is swapped whole.
#[derive(Default)]
pub(crate) struct Observed(ArcSwap<Fence>);

impl Observed {
    #[inline]
    pub(crate) fn get(&self) -> Fence {
        **self.0.load()
    }

    /// Takes a newer counter of the same incarnation, or another incarnation.
    pub(crate) fn observe(&self, seen: Fence) {
        let newer = |current: &Fence| current.id != seen.id || current.seq < seen.seq;
        if seen.id == 0 || !newer(&self.0.load()) {
            return;
        }
        self.0.rcu(|current| if newer(current) { Arc::new(seen) } else { Arc::clone(current) });
    }
}

/// Shared by every fence script. `F` is the hash.
const PRELUDE: &str = r"
local F = KEYS[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The incarnation, created when missing ('' when it can't be: OOM).
local function incarnation(nonce)
  local id = redis.call('HGET', F, 'id')
  if id then return id, tonumber(redis.call('HGET', F, 'seq') or '0') end
  local r = redis.pcall('HSET', F, 'id', nonce, 'seq', 0, 'orphans', 'new')
  if type(r) == 'table' and r.err then return '', 0 end
  return nonce, 0
end
-- Takes the next seq and stamps `fields` with it. What can't be recorded drops
-- the incarnation instead (DEL works under OOM): every fill in flight is refused.
local function fence(nonce, fields)
  local id = incarnation(nonce)
  if id ~= '' then
    local seq = redis.pcall('HINCRBY', F, 'seq', 1)
    if type(seq) ~= 'table' then
      local stamp = seq .. '|' .. now_ms()
      local ok = true
      for _, f in ipairs(fields) do
        local r = redis.pcall('HSET', F, f, stamp)
        if type(r) == 'table' and r.err then ok = false break end
      end
      if ok then return id, seq end
    end
  end
  redis.call('DEL', F)
  return '', 0
end
";

// KEYS: fence, entry, body, tag indexes…; ARGV: nonce, bytes, ttl ms, expected
// id ('' = unfenced), expected seq, mode ('1': fence the key after writing, so
// fills that read before this write are refused; '2': only check), the body ('' = none: the
// entry holds the value itself), what the entry must still hold if it exists
// ('' = anything: a write-back never replaces a newer fill), the SHA-1 (hex)
// its body must still hash to ('' = no body), tag names… (one per index).
// Returns {stored, id, seq}.
const FILL: &str = r"
local entry, ttl, exp_id, exp = KEYS[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local id, seq
if exp_id ~= '' then
  -- One read for every field the check needs: the miss path's server time.
  local fields = {'id', 'seq', 'k:' .. entry, 'pn', 'floor'}
  for i = 10, #ARGV do fields[#fields + 1] = 't:' .. ARGV[i] end
  local v = redis.call('HMGET', F, unpack(fields))
  if not v[1] then
    id, seq = incarnation(ARGV[1])
    return {0, id, seq}
  end
  id, seq = v[1], tonumber(v[2])
  -- Stamps up to `floor` were pruned: a fill that old can't be checked.
  if id ~= exp_id or (v[5] and exp < tonumber(v[5])) then return {0, id, seq} end
  for i = 3, #fields do
    if i ~= 4 and i ~= 5 and v[i] and tonumber(string.match(v[i], '^%d+')) > exp then return {0, id, seq} end
  end
  if v[4] then
    for s in string.gmatch(v[4], '(%d+):%d+') do
      if tonumber(s) > exp then
        local pat = redis.call('HGET', F, 'p:' .. s)
        if pat and string.find(entry, pat) then return {0, id, seq} end
      end
    end
  end
else
  id, seq = incarnation(ARGV[1])
end
-- Mode '2' asks whether the fill would be stored, and stores nothing.
if ARGV[6] == '2' then return {1, id, seq} end
if ARGV[8] ~= '' then
  local held = redis.call('GET', entry)
  if held and (held ~= ARGV[8] or (ARGV[9] ~= '' and redis.sha1hex(redis.call('GET', KEYS[3]) or '') ~= ARGV[9])) then
    return {0, id, seq}
  end
end
-- The body first: a reader that finds the new pointer finds its body.
if ARGV[7] ~= '' then redis.call('SET', KEYS[3], ARGV[7], 'PX', ttl) end
redis.call('SET', entry, ARGV[2], 'PX', ttl)
if ARGV[6] == '1' then id, seq = fence(ARGV[1], {'k:' .. entry}) end
if #KEYS > 3 then
  local now = now_ms()
  for i = 4, #KEYS do
    local note = 'r:' .. ARGV[i + 6]
    local noted = tonumber(redis.call('HGET', F, note) or '0')
    if noted > now and redis.call('EXISTS', KEYS[i]) == 0 then
      -- The index was lost while entries it listed live: a new one would hide them.
      redis.call('HSET', F, 'orphans', 'lost:' .. ARGV[1])
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    redis.call('ZADD', KEYS[i], now + ttl, entry)
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
    if noted < now + ttl then redis.call('HSET', F, note, now + ttl) end
  end
end
return {1, id, seq}
";

// KEYS: fence, entry, body; ARGV: nonce. Returns {deleted, id, seq}.
const INVALIDATE_KEY: &str = r"
local id, seq = fence(ARGV[1], {'k:' .. KEYS[2]})
redis.call('UNLINK', KEYS[3])
return {redis.call('UNLINK', KEYS[2]), id, seq}
";

// KEYS: fence, tag indexes… (n), their dead sets… (n); ARGV: nonce, tag names… (n).
// Fences the tags, then moves each index to its dead set for draining (noted as
// `d:<tag>` until drained). An index whose dead set from an earlier call is
// still there stays put (`waiting`): the caller drains and calls again. An index
// or a dead set that is gone while its note lives, or any tag while entries of
// an earlier incarnation may remain, means entries may be unreachable (`lost`):
// `orphans` holds this call's token until a whole-prefix clear settles it.
// Returns {id, seq, lost, waiting, token, positions of the dead sets to drain…}.
const FENCE_TAGS: &str = r"
local n = #ARGV - 1
local now = now_ms()
local orphans = redis.call('HGET', F, 'orphans')
local fields, lost, gone = {}, 0, {}
if orphans ~= '0' then lost = 1 end
for i = 1, n do
  local tag, index, dead = ARGV[i + 1], KEYS[i + 1], KEYS[n + i + 1]
  fields[#fields + 1] = 't:' .. tag
  if redis.call('EXISTS', index) == 0 then
    if tonumber(redis.call('HGET', F, 'r:' .. tag) or '0') > now then lost = 1 end
    gone[#gone + 1] = 'r:' .. tag
  end
  if redis.call('EXISTS', dead) == 0 and redis.call('HEXISTS', F, 'd:' .. tag) == 1 then
    lost = 1
    gone[#gone + 1] = 'd:' .. tag
  end
end
local id, seq = fence(ARGV[1], fields)
local token = ''
if id ~= '' and lost == 1 then
  token = tostring(seq)
  redis.call('HSET', F, 'orphans', token)
  for _, note in ipairs(gone) do redis.call('HDEL', F, note) end
end
local waiting, drain = 0, {}
for i = 1, n do
  local tag, index, dead = ARGV[i + 1], KEYS[i + 1], KEYS[n + i + 1]
  if redis.call('EXISTS', dead) == 1 then
    drain[#drain + 1] = i
    if redis.call('EXISTS', index) == 1 then waiting = 1 end
  elseif redis.call('EXISTS', index) == 1 then
    redis.call('RENAME', index, dead)
    drain[#drain + 1] = i
    if id ~= '' then
      redis.call('HSET', F, 'd:' .. tag, 1)
      redis.call('HDEL', F, 'r:' .. tag)
    end
  end
end
return {id, seq, lost, waiting, token, drain}
";

// KEYS: a dead set, fence; ARGV: batch, tag, token. Deletes one batch of the
// entries the dead set lists. A dead set that is gone while its note lives was
// evicted with entries it listed: `orphans` takes the token until a clear of
// the prefix settles it. Returns {entries deleted, members left, token or ''}.
const DRAIN: &str = r"
local note = 'd:' .. ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('HEXISTS', KEYS[2], note) == 1 then
    redis.call('HSET', KEYS[2], 'orphans', ARGV[3])
    redis.call('HDEL', KEYS[2], note)
    return {0, 0, ARGV[3]}
  end
  return {0, 0, ''}
end
local members = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local n = redis.call('UNLINK', unpack(members))
redis.call('ZREM', KEYS[1], unpack(members))
local left = redis.call('ZCARD', KEYS[1])
if left == 0 then redis.call('HDEL', KEYS[2], note) end
return {n, left, ''}
";

// KEYS: fence; ARGV: nonce, Lua pattern. Returns {id, seq}.
const FENCE_PATTERN: &str = r"
local id, seq = fence(ARGV[1], {})
if id ~= '' then
  redis.call('HSET', F, 'p:' .. seq, ARGV[2])
  redis.call('HSET', F, 'pn', (redis.call('HGET', F, 'pn') or '') .. seq .. ':' .. now_ms() .. ' ')
end
return {id, seq}
";

// KEYS: fence; ARGV: nonce. A new incarnation: every fill in flight is refused.
// Returns {id, seq}.
const FENCE_ALL: &str = r"
redis.call('DEL', F)
local id, seq = incarnation(ARGV[1])
return {id, seq}
";

// KEYS: fence; ARGV: nonce. Returns {id, seq, orphans}, creating the hash if
// it is gone.
const OBSERVE: &str = r"
local id, seq = incarnation(ARGV[1])
return {id, seq, redis.call('HGET', F, 'orphans') or '0'}
";

// KEYS: fence; ARGV: id, token. After a whole-prefix clear started under this
// token no entry it stood for is left: tag indexes that are gone no longer mean
// lost entries. A newer token (another loss found meanwhile) is left alone.
const SETTLE: &str = r"
if redis.call('HGET', F, 'id') == ARGV[1] and redis.call('HGET', F, 'orphans') == ARGV[2] then
  redis.call('HSET', F, 'orphans', 0)
end
return 0
";

// KEYS: fence; ARGV: cursor, horizon ms. Drops fences older than the horizon
// and tag notes whose entries expired; 500 fields per call. `floor` keeps the
// newest pruned seq: a fill expecting less is refused (its stamps may be gone,
// whatever the clocks say). Returns the cursor.
const PRUNE: &str = r"
local now = now_ms()
local oldest = now - tonumber(ARGV[2])
local page = redis.call('HSCAN', F, ARGV[1], 'COUNT', 500)
local fields = page[2]
local floor = tonumber(redis.call('HGET', F, 'floor') or '0')
for i = 1, #fields, 2 do
  local f, v = fields[i], fields[i + 1]
  local kind = string.sub(f, 1, 2)
  if kind == 'k:' or kind == 't:' then
    local t = tonumber(string.match(v, '|(%d+)$'))
    if t and t < oldest then
      redis.call('HDEL', F, f)
      floor = math.max(floor, tonumber(string.match(v, '^%d+')))
    end
  elseif kind == 'r:' and tonumber(v) < now then
    redis.call('HDEL', F, f)
  end
end
if page[1] == '0' then
  local pn = redis.call('HGET', F, 'pn')
  if pn then
    local keep = ''
    for s, t in string.gmatch(pn, '(%d+):(%d+)') do
      if tonumber(t) < oldest then
        redis.call('HDEL', F, 'p:' .. s)
        floor = math.max(floor, tonumber(s))
      else
        keep = keep .. s .. ':' .. t .. ' '
      end
    end
    redis.call('HSET', F, 'pn', keep)
  end
end
if floor > 0 and redis.call('EXISTS', F) == 1 then redis.call('HSET', F, 'floor', floor) end
return page[1]
";

// KEYS: entry; ARGV: the bytes read. Removes an unreadable entry only if it is
// still the one read, without fencing: its replacement must not be refused.
const DROP_IF_SAME: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('UNLINK', KEYS[1]) end
return 0
";

/// The fence scripts, compiled once per store.
pub(crate) struct FenceScripts {
    fill: Script,
    invalidate_key: Script,
    fence_tags: Script,
    drain: Script,
    fence_pattern: Script,
    fence_all: Script,
    observe: Script,
    settle: Script,
    prune: Script,
    drop_if_same: Script,
}

impl FenceScripts {
    pub(crate) fn new() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        FenceScripts {
            fill: with_prelude(FILL),
            invalidate_key: with_prelude(INVALIDATE_KEY),
            fence_tags: with_prelude(FENCE_TAGS),
            drain: Script::new(DRAIN),
            fence_pattern: with_prelude(FENCE_PATTERN),
            fence_all: with_prelude(FENCE_ALL),
            observe: with_prelude(OBSERVE),
            settle: with_prelude(SETTLE),
            prune: with_prelude(PRUNE),
            drop_if_same: Script::new(DROP_IF_SAME),
        }
    }
}

/// A tag to fence: its name, its index and its dead set.
pub(crate) struct TagKeys {
    pub(crate) tag: String,
    pub(crate) index: String,
    pub(crate) dead: String,
}

/// A tag invalidation's fence: what it saw, and what is left to delete.
pub(crate) struct TagFence {
    pub(crate) fence: Fence,
    /// An index is gone while entries it listed may remain: clear the prefix.
    pub(crate) lost: bool,
    /// An index could not be set aside yet: drain `dead`, then fence again.
    pub(crate) waiting: bool,
    /// What [`settle`](RedisStore::settle) takes once the prefix was cleared.
    pub(crate) token: String,
    /// Positions (in the tags given) of the dead sets to drain.
    pub(crate) drain: Vec<usize>,
}

/// A write: what is stored, under which fence, and what it invalidates.
pub(crate) struct Fill<'a> {
    pub(crate) entry: &'a str,
    /// What `entry` holds: the value, or a pointer to `body`.
    pub(crate) bytes: &'a [u8],
    /// Where a big value's bytes go (named whether or not there is one).
    pub(crate) body_key: &'a str,
    /// A big value's bytes, stored apart from the pointer in `bytes`.
    pub(crate) body: Option<&'a [u8]>,
    pub(crate) ttl: Duration,
    /// `(tag, index key)` pairs.
    pub(crate) tags: &'a [(String, String)],
    /// The fence seen before the read; `None` writes whatever happened since.
    pub(crate) expected: Option<Fence>,
    /// Refuse the fills of this key that read before this write.
    pub(crate) bump: bool,
    /// Check `expected` only; store nothing.
    pub(crate) check_only: bool,
    /// Store only where `entry` is gone or still holds what a read found.
    pub(crate) replaces: Option<Held<'a>>,
}

/// What an entry held when a read found it, as stored: a write-back of that
/// read stores only over the same bytes, never over a newer fill.
pub(crate) struct Held<'a> {
    pub(crate) entry: &'a [u8],
    /// A big value's body, as its SHA-1 (hex): its pointer holds only its size.
    pub(crate) body_sha1: Option<String>,
}

fn parse_id(id: &str) -> u64 {
    id.parse().unwrap_or(0)
}

/// A non-zero incarnation id, offered each time one may be created: a random
/// 64-bit base per process plus a counter, so no two offers repeat, here or in
/// another process, without a random draw per call.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static BASE: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        // A RandomState is randomly keyed from the OS.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        h.write_u128(now.as_nanos() ^ u128::from(std::process::id()));
        h.finish()
    });
    base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)).max(1)
}

/// Where a write travels: a big value on a connection of its own; a `set`,
/// which fences its key, where invalidations go (see [`Lane::Fence`]).
pub(crate) fn fill_lane(fill: &Fill<'_>) -> Lane {
    match fill.body {
        Some(body) => Lane::Bulk(body.len()),
        None if fill.bump => Lane::Fence,
        None => Lane::Hot,
    }
}

impl RedisStore {
    /// Writes a fill or a `set`; whether it was stored, and the fence now.
    pub(crate) async fn fill(&self, fence_key: &str, fill: Fill<'_>) -> Result<(bool, Fence), CacheError> {
        // EVALSHA built directly: a `ScriptInvocation` would copy every argument,
        // the value included, once more on the miss path.
        let script = &self.fences.fill;
        let mut call = redis::cmd("EVALSHA");
        call.arg(script.get_hash())
            .arg(3 + fill.tags.len())
            .arg(fence_key)
            .arg(fill.entry)
            .arg(fill.body_key);
        for (_, index) in fill.tags {
            call.arg(index);
        }
        call.arg(nonce()).arg(fill.bytes).arg(fill.ttl.as_millis().max(1) as u64);
        match fill.expected {
            Some(f) => call.arg(f.id),
            None => call.arg(""),
        };
        let mode = match (fill.check_only, fill.bump) {
            (true, _) => "2",
            (false, true) => "1",
            (false, false) => "0",
        };
        call.arg(fill.expected.map_or(0, |f| f.seq)).arg(mode);
        call.arg(fill.body.unwrap_or_default());
        match &fill.replaces {
            Some(held) => call.arg(held.entry).arg(held.body_sha1.as_deref().unwrap_or_default()),
            None => call.arg("").arg(""),
        };
        for (tag, _) in fill.tags {
            call.arg(tag);
        }
        let call = &call;
        let lane = fill_lane(&fill);
        let (stored, id, seq): (i64, String, u64) = self
            .run_in(lane, |mut conn| async move {
                match call.query_async(&mut conn).await {
                    Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                        script.load_async(&mut conn).await?;
                        call.query_async(&mut conn).await
                    }
                    other => other,
                }
            })
            .await?;
        Ok((stored == 1, Fence { id: parse_id(&id), seq }))
    }

    /// Fences `entry` and deletes it; whether it existed.
    pub(crate) async fn invalidate_key(
        &self,
        fence_key: &str,
        entry: &str,
        body: &str,
    ) -> Result<(bool, Fence), CacheError> {
        let mut call = self.fences.invalidate_key.key(fence_key);
        call.key(entry).key(body).arg(nonce());
        let (n, id, seq): (u64, String, u64) =
            self.run_in(Lane::Fence, |mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        Ok((n > 0, Fence { id: parse_id(&id), seq }))
    }

    /// Fences `tags` and sets their indexes aside.
    pub(crate) async fn fence_tags(&self, fence_key: &str, tags: &[TagKeys]) -> Result<TagFence, CacheError> {
        let mut call = self.fences.fence_tags.key(fence_key);
        for t in tags {
            call.key(&t.index);
        }
        for t in tags {
            call.key(&t.dead);
        }
        call.arg(nonce());
        for t in tags {
            call.arg(&t.tag);
        }
        let (id, seq, lost, waiting, token, drain): (String, u64, i64, i64, String, Vec<usize>) =
            self.run_in(Lane::Fence, |mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        let fence = Fence { id: parse_id(&id), seq };
        let drain = drain.into_iter().map(|i| i - 1).collect();
        Ok(TagFence { fence, lost: lost == 1, waiting: waiting == 1, token, drain })
    }

    /// Deletes every entry a dead set lists, a batch per script; how many went,
    /// and the token to settle when the dead set was lost (evicted) before it
    /// was drained.
    pub(crate) async fn drain(
        &self,
        fence_key: &str,
        t: &TagKeys,
    ) -> Result<(u64, Option<String>), CacheError> {
        let token = format!("dead:{}", nonce());
        let mut deleted = 0;
        loop {
            let mut call = self.fences.drain.key(&t.dead);
            call.key(fence_key).arg(DRAIN_BATCH).arg(&t.tag).arg(&token);
            let (n, left, lost): (u64, u64, String) = self
                .run_in(Lane::Fence, |mut conn| async move { call.invoke_async(&mut conn).await })
                .await?;
            deleted += n;
            if left == 0 {
                return Ok((deleted, (!lost.is_empty()).then_some(lost)));
            }
        }
    }

    /// Fences every key matching `lua_pattern` (see `glob::to_lua_pattern`).
    pub(crate) async fn fence_pattern(
        &self,
        fence_key: &str,
        lua_pattern: &[u8],
    ) -> Result<Fence, CacheError> {
        let mut call = self.fences.fence_pattern.key(fence_key);
        call.arg(nonce()).arg(lua_pattern);
        self.fence_reply(call).await
    }

    /// Starts a new incarnation: every fill in flight is refused.
    pub(crate) async fn fence_all(&self, fence_key: &str) -> Result<Fence, CacheError> {
        let mut call = self.fences.fence_all.key(fence_key);
        call.arg(nonce());
        self.fence_reply(call).await
    }

    /// The current fence, creating the hash if it is gone, and the token of an
    /// unsettled loss (`None` when no entry can be orphaned).
    pub(crate) async fn observe(&self, fence_key: &str) -> Result<(Fence, Option<String>), CacheError> {
        let mut call = self.fences.observe.key(fence_key);
        call.arg(nonce());
        let (id, seq, orphans): (String, u64, String) =
            self.run(|mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        Ok((Fence { id: parse_id(&id), seq }, (orphans != "0").then_some(orphans)))
    }

    /// Records that the clear started under `token` (`"new"` for a new
    /// incarnation) is done: no entry it stood for is left.
    pub(crate) async fn settle(&self, fence_key: &str, id: u64, token: &str) -> Result<(), CacheError> {
        let mut call = self.fences.settle.key(fence_key);
        call.arg(id.to_string()).arg(token);
        let _: i64 = self.run(|mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        Ok(())
    }

    /// Drops fences no fill can need any more; returns the next cursor (0: done).
    pub(crate) async fn prune(&self, fence_key: &str, cursor: u64) -> Result<u64, CacheError> {
        let mut call = self.fences.prune.key(fence_key);
        call.arg(cursor).arg((WINDOW * 2).as_millis() as u64);
        let next: String = self.run(|mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        Ok(next.parse().unwrap_or(0))
    }

    /// Deletes `entry` if it still holds `bytes`, fencing nothing.
    pub(crate) async fn drop_if_same(&self, entry: &str, bytes: &[u8]) -> Result<bool, CacheError> {
        let mut call = self.fences.drop_if_same.key(entry);
        call.arg(bytes);
        let n: u64 = self.run(|mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        Ok(n > 0)
    }

    async fn fence_reply(&self, call: redis::ScriptInvocation<'_>) -> Result<Fence, CacheError> {
        let (id, seq): (String, u64) =
            self.run_in(Lane::Fence, |mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        Ok(Fence { id: parse_id(&id), seq })
    }
}
