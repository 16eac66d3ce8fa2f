//! What the cache needs of its Redis user, checked command by command.
//!
//! An ACL user without `@scripting`, or without the internal `{prefix}#*` keys,
//! connects and answers PING, then fails every fill and invalidation. Checked at
//! start, that is one error that names the refused command or key; found later
//! (an ACL changed), the same check decides when the cause is gone.
//!
//! Every probe touches only keys of its own: `{prefix}:#probe` is read, and
//! written only when absent (NX, 50 ms), so an existing key of that name is left
//! alone; `{prefix}#probe`, `{prefix}#probe:z` and `{prefix}#probe:h` are internal.
//! PUBLISH is not required: the bus checks it itself, and a refusal turns the
//! bus off rather than the cache (`bus.rs`).

use redis::Script;

use crate::redis_store::RedisStore;
use crate::schema::Schema;
use crate::CacheError;

/// Every command the cache's Lua scripts call, on the key kinds they call it on.
/// Errors other than ACL refusals (OOM, READONLY) are not the probe's business.
const PROBE_SCRIPT: &str = r"
local entry, internal, tags, fence = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local checks = {
  {'GET', entry}, {'EXISTS', entry}, {'PTTL', entry}, {'GETRANGE', entry, 0, 8},
  {'SET', internal, '0', 'PX', 1000}, {'GET', internal}, {'EXISTS', internal},
  {'TIME'},
  {'HSET', fence, 'probe', 1}, {'HGET', fence, 'probe'}, {'HEXISTS', fence, 'probe'},
  {'HINCRBY', fence, 'probe', 1}, {'HMGET', fence, 'probe', 'id'},
  {'HSCAN', fence, 0, 'COUNT', 1}, {'HDEL', fence, 'probe'}, {'DEL', fence},
  {'ZREMRANGEBYSCORE', tags, '-inf', 0}, {'ZADD', tags, 1, entry}, {'ZRANGE', tags, 0, -1},
  {'ZCARD', tags}, {'PTTL', tags}, {'PEXPIRE', tags, 1000}, {'RENAME', tags, internal},
  {'ZREM', internal, entry}, {'UNLINK', internal, tags},
}
local function refused(err)
  return string.find(err, 'NOPERM', 1, true) or string.find(err, 'can.t run this command')
end
local created = redis.pcall('SET', entry, '', 'PX', 50, 'NX')
if type(created) == 'table' and created.err then
  if refused(created.err) then return {'SET', created.err} end
  created = false
end
local found = {}
for _, c in ipairs(checks) do
  local r = redis.pcall(unpack(c))
  if type(r) == 'table' and r.err and refused(r.err) then
    found = {c[1], r.err}
    break
  end
end
if created then
  local r = redis.pcall('UNLINK', entry)
  if #found == 0 and type(r) == 'table' and r.err and refused(r.err) then found = {'UNLINK', r.err} end
end
redis.pcall('UNLINK', internal, tags, fence)
return found
";

impl RedisStore {
    /// Runs every command the cache uses against probe keys of `schema`.
    /// `Err` is an [`Auth`](CacheError::Auth) or
    /// [`Permission`](CacheError::Permission) error naming what was refused, or
    /// the error that kept the probe from reaching Redis.
    pub(crate) async fn check_access(&self, schema: &Schema) -> Result<(), CacheError> {
        let prefix = schema.prefix();
        let entry = schema.entry("#probe");
        // In the entry's shard: the probe script touches them all at once.
        let shard = schema.shard_of(&entry);
        let internal = schema.internal(shard, "probe");
        let tags = schema.internal(shard, "probe:z");
        let fence = schema.internal(shard, "probe:h");
        let scan = schema.all_entries();
        let steps = [
            redis::cmd("PING"),
            redis::cmd("GET").arg(&entry).clone(),
            redis::cmd("SET").arg(&internal).arg("0").arg("PX").arg(1000).clone(),
            redis::cmd("EXISTS").arg(&internal).clone(),
            redis::cmd("PTTL").arg(&internal).clone(),
            redis::cmd("UNLINK").arg(&internal).clone(),
            redis::cmd("SCAN").arg(0).arg("MATCH").arg(&scan).arg("COUNT").arg(1).clone(),
            redis::cmd("INFO").arg("server").clone(),
        ];
        // A cluster's slot map (the client's) and topology (SCAN's), and the
        // wait for a replica after an invalidation.
        let cluster_steps =
            [redis::cmd("CLUSTER").arg("SLOTS").clone(), redis::cmd("CLUSTER").arg("NODES").clone()];
        let cluster_steps = if self.is_cluster() { &cluster_steps[..] } else { &[] };
        for step in steps.iter().chain(cluster_steps) {
            match self.query::<redis::Value>(step).await {
                Ok(_) => {}
                Err(e) => self.judge(e, prefix)?,
            }
        }
        if let Err(e) = self.probe_wait(&entry).await {
            self.judge(e, prefix)?;
        }
        let script = Script::new(PROBE_SCRIPT);
        let load = redis::cmd("SCRIPT").arg("LOAD").arg(PROBE_SCRIPT).clone();
        if let Err(e) = self.query::<String>(&load).await {
            return self.judge(e, prefix);
        }
        let mut call = script.key(&entry);
        call.key(&internal).key(&tags).key(&fence);
        let refused: Vec<String> =
            match self.run(|mut conn| async move { call.invoke_async(&mut conn).await }).await {
                Ok(refused) => refused,
                Err(e) => return self.judge(e, prefix),
            };
        match refused.as_slice() {
            [command, message, ..] => Err(CacheError::Permission {
                action: format!("run {command} inside the cache's Lua scripts"),
                message: message.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Passes on what stops the cache (credentials, permissions, no Redis);
    /// anything else (OOM, a read-only replica) is a state, not a misconfiguration.
    fn judge(&self, e: CacheError, prefix: &str) -> Result<(), CacheError> {
        match e {
            CacheError::Permission { action, message } if action.contains("keys") => {
                Err(CacheError::Permission {
                    action: format!(
                        "access its keys (it reads and writes `{prefix}:*` and its internal `{prefix}#*`)"
                    ),
                    message,
                })
            }
            e if e.is_misconfiguration() || e.is_unavailable() => Err(e),
            e => {
                tracing::debug!(error = %e, "access check: not a permission problem");
                Ok(())
            }
        }
    }
}
