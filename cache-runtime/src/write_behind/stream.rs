//! The write-behind queue in Redis: one stream of jobs with one consumer
//! group, a dead-letter stream beside it and the active flusher's lease, all
//! under one hash tag (`Schema::write_behind`).
//!
//! A job is acknowledged with `XACK` and `XDEL` in one script, so that the
//! stream holds exactly the jobs not yet done: `XLEN` is the queue's length
//! and its first entry the oldest job waiting.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{Script, Value};

use crate::redis_store::{Lane, RedisStore};
use crate::schema::Schema;
use crate::CacheError;

/// The consumer group every flusher reads through.
pub(crate) const GROUP: &str = "flusher";

/// The one consumer name every flusher reads as: only one flusher is active
/// at a time (the lease, which fences every read), and a new one finds the
/// jobs its predecessor had read but not acknowledged in this consumer's
/// pending list.
pub(crate) const CONSUMER: &str = "active";

/// The keys of one cache's queue.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) jobs: String,
    pub(crate) dead: String,
    pub(crate) lease: String,
}

impl Keys {
    pub(crate) fn new(schema: &Schema) -> Keys {
        Keys {
            jobs: schema.write_behind("jobs"),
            dead: schema.write_behind("dead"),
            lease: schema.write_behind("flusher"),
        }
    }
}

const ACK: &str = r"
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
";

// Moved and acknowledged in one script: a job is in one stream or the other, never both, never neither.
// Acknowledged first: a job settled already (a retried script, another
// flusher's) is not dead-lettered again.
const DEAD_LETTER: &str = r"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'id', ARGV[7], 'entry', ARGV[2], 'key', ARGV[3], 'job', ARGV[4], 'error', ARGV[5], 'attempts', ARGV[6])
return redis.call('XDEL', KEYS[1], ARGV[2])
";

// KEYS: lease, jobs; ARGV: token, group, consumer, count, id ('>' = new jobs).
// Reads only while `token` holds the lease: a read sent by a flusher that has
// lost it and reaching Redis late (a partition that heals) moves nothing into
// the pending list behind the back of the flusher that took over. Returns -1
// when another holds it (or nobody); else {entries or nil, the id of the last
// entry in the stream ('0-0' when empty) when none were read}.
const READ: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local read = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4], 'STREAMS', KEYS[2], ARGV[5])
if read then return {read, ''} end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
return {false, last and last[1] or '0-0'}
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
";

pub(crate) struct Scripts {
    read: Script,
    ack: Script,
    dead_letter: Script,
    renew: Script,
    release: Script,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        Scripts {
            read: Script::new(READ),
            ack: Script::new(ACK),
            dead_letter: Script::new(DEAD_LETTER),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        }
    }
}

/// One entry read from the jobs stream.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The stream entry's id.
    pub(crate) id: String,
    /// The idempotency key `write_behind` gave the job; `None` for a job
    /// queued without one (the entry id stands in).
    pub(crate) token: Option<String>,
    /// The cache key and the encoded job; `None` for an entry whose fields
    /// are gone or are not a job's.
    pub(crate) job: Option<(String, Vec<u8>)>,
    /// Read back from the pending list: a flusher may have handled it before.
    pub(crate) redelivered: bool,
}

/// What the queue holds now.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Figures {
    pub(crate) length: u64,
    pub(crate) oldest_age: Duration,
}

fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

impl RedisStore {
    /// Appends a job under the idempotency key `token`. A client that sends
    /// the XADD again (a cluster client retrying a timed-out command) may
    /// append it twice: both copies carry the same token.
    pub(crate) async fn enqueue(
        &self,
        keys: &Keys,
        key: &str,
        job: &[u8],
        token: &str,
    ) -> Result<(), CacheError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&keys.jobs).arg("*").arg("key").arg(key).arg("job").arg(job).arg("idem").arg(token);
        let _: String =
            self.run_in(Lane::Hot, |mut conn| async move { cmd.query_async(&mut conn).await }).await?;
        Ok(())
    }

    /// Creates the consumer group (and the stream) unless it exists. From the
    /// stream's start: jobs queued before any flusher ever ran are read too.
    pub(crate) async fn ensure_group(&self, keys: &Keys) -> Result<(), CacheError> {
        let cmd =
            redis::cmd("XGROUP").arg("CREATE").arg(&keys.jobs).arg(GROUP).arg("0").arg("MKSTREAM").take();
        match self.run_in(Lane::Hot, |mut conn| async move { cmd.query_async::<()>(&mut conn).await }).await {
            Err(CacheError::Redis(e)) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    pub(crate) async fn ack(&self, scripts: &Scripts, keys: &Keys, id: &str) -> Result<(), CacheError> {
        let mut call = scripts.ack.key(&keys.jobs);
        call.arg(GROUP).arg(id);
        self.run_in(Lane::Hot, |mut conn| async move { call.invoke_async::<i64>(&mut conn).await }).await?;
        Ok(())
    }

    pub(crate) async fn dead_letter(
        &self,
        scripts: &Scripts,
        keys: &Keys,
        entry: &Entry,
        error: &str,
        attempts: u32,
    ) -> Result<(), CacheError> {
        let (key, job) = entry.job.as_ref().map_or(("", &[][..]), |(k, j)| (k.as_str(), j.as_slice()));
        let mut call = scripts.dead_letter.key(&keys.jobs);
        call.key(&keys.dead).arg(GROUP).arg(&entry.id).arg(key).arg(job).arg(error).arg(attempts);
        call.arg(entry.token.as_deref().unwrap_or(&entry.id));
        self.run_in(Lane::Hot, |mut conn| async move { call.invoke_async::<i64>(&mut conn).await }).await?;
        Ok(())
    }

    /// Takes the flusher lease if nobody holds it: whether this call holds it now.
    pub(crate) async fn take_flusher_lease(
        &self,
        keys: &Keys,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        let cmd = redis::cmd("SET").arg(&keys.lease).arg(token).arg("NX").arg("PX").arg(millis(ttl)).take();
        let set: Option<String> =
            self.run_in(Lane::Hot, |mut conn| async move { cmd.query_async(&mut conn).await }).await?;
        Ok(set.is_some())
    }

    pub(crate) async fn renew_flusher_lease(
        &self,
        scripts: &Scripts,
        keys: &Keys,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        let mut call = scripts.renew.key(&keys.lease);
        call.arg(token).arg(millis(ttl));
        let renewed: i64 =
            self.run_in(Lane::Hot, |mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        Ok(renewed == 1)
    }

    pub(crate) async fn release_flusher_lease(
        &self,
        scripts: &Scripts,
        keys: &Keys,
        token: &str,
    ) -> Result<(), CacheError> {
        let mut call = scripts.release.key(&keys.lease);
        call.arg(token);
        self.run_in(Lane::Hot, |mut conn| async move { call.invoke_async::<i64>(&mut conn).await }).await?;
        Ok(())
    }

    /// The queue's length and the age of its oldest job, by this host's clock
    /// against the server's (entry ids are the server's milliseconds).
    pub(crate) async fn queue_figures(&self, keys: &Keys) -> Result<Figures, CacheError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(&keys.jobs).cmd("XRANGE").arg(&keys.jobs).arg("-").arg("+").arg("COUNT").arg(1);
        let pipe = &pipe;
        let (length, first): (u64, Value) =
            self.run_in(Lane::Hot, |mut conn| async move { pipe.query_async(&mut conn).await }).await?;
        let oldest = entries(first).into_iter().next().map_or(0, |e| id_millis(&e.id));
        let oldest_age = if length == 0 || oldest == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(crate::codec::now_ms().saturating_sub(oldest))
        };
        Ok(Figures { length, oldest_age })
    }
}

/// What a read found.
pub(crate) enum Read {
    Entries(Vec<Entry>),
    /// The lease is not `token`'s (any more): nothing was read.
    NotHolder,
}

/// Reads up to `count` entries on `conn`, a connection of the flusher's own,
/// while `token` holds the lease: from its pending list after `after`, or
/// new ones (`after` = `None`), waiting up to `block` for one.
///
/// The read itself is a script, so that it is fenced by the lease; scripts
/// don't block, so the wait is a plain `XREAD BLOCK` from the stream's last
/// entry, which moves nothing: one that reaches Redis late is harmless.
pub(crate) async fn read(
    conn: &mut MultiplexedConnection,
    scripts: &Scripts,
    keys: &Keys,
    token: &str,
    after: Option<&str>,
    count: usize,
    block: Duration,
) -> Result<Read, CacheError> {
    let mut call = scripts.read.key(&keys.lease);
    call.key(&keys.jobs).arg(token).arg(GROUP).arg(CONSUMER).arg(count.max(1)).arg(after.unwrap_or(">"));
    let mut waited = false;
    loop {
        let (read, last) = match call.invoke_async::<Value>(conn).await? {
            Value::Int(_) => return Ok(Read::NotHolder),
            Value::Array(mut reply) if reply.len() == 2 => {
                let last = text(reply.pop().unwrap_or(Value::Nil)).unwrap_or_default();
                (reply.pop().unwrap_or(Value::Nil), last)
            }
            other => {
                let message = format!("unexpected reply to the write-behind read: {other:?}");
                return Err(CacheError::Redis(redis::RedisError::from((
                    redis::ErrorKind::Parse,
                    "bad reply",
                    message,
                ))));
            }
        };
        let mut entries = read_entries(read);
        if !entries.is_empty() || after.is_some() || waited {
            for entry in &mut entries {
                entry.redelivered = after.is_some();
            }
            return Ok(Read::Entries(entries));
        }
        // Nothing new: wait for an entry past the stream's last, then read it fenced.
        let mut wait = redis::cmd("XREAD");
        wait.arg("COUNT").arg(1).arg("BLOCK").arg(millis(block)).arg("STREAMS").arg(&keys.jobs).arg(&last);
        let woken: Value = wait.query_async(conn).await?;
        if matches!(woken, Value::Nil) {
            return Ok(Read::Entries(Vec::new()));
        }
        waited = true;
    }
}

/// The entries of an XREADGROUP reply: `[[stream, [entry, …]]]`, or nil when there were none.
fn read_entries(reply: Value) -> Vec<Entry> {
    let mut read = Vec::new();
    if let Value::Array(streams) = reply {
        for stream in streams {
            if let Value::Array(mut parts) = stream {
                if parts.len() == 2 {
                    read.extend(entries(parts.swap_remove(1)));
                }
            }
        }
    }
    read
}

/// Entries of an XRANGE or XREADGROUP reply: `[[id, [field, value, …] or nil], …]`.
fn entries(reply: Value) -> Vec<Entry> {
    let Value::Array(items) = reply else { return Vec::new() };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(mut pair) = item else { return None };
            if pair.len() != 2 {
                return None;
            }
            let fields = pair.pop()?;
            let id = text(pair.pop()?)?;
            let token = field(&fields, b"idem").and_then(|v| String::from_utf8(v).ok());
            Some(Entry { id, job: job(fields), token, redelivered: false })
        })
        .collect()
}

/// The value of the field `name` of an entry's fields.
fn field(fields: &Value, name: &[u8]) -> Option<Vec<u8>> {
    let Value::Array(fields) = fields else { return None };
    fields.chunks_exact(2).find_map(|pair| match (&pair[0], &pair[1]) {
        (Value::BulkString(n), Value::BulkString(value)) if n == name => Some(value.clone()),
        _ => None,
    })
}

fn job(fields: Value) -> Option<(String, Vec<u8>)> {
    let Value::Array(fields) = fields else { return None };
    let (mut key, mut job) = (None, None);
    for pair in fields.chunks_exact(2) {
        match (&pair[0], &pair[1]) {
            (Value::BulkString(name), Value::BulkString(value)) if name == b"key" => {
                key = String::from_utf8(value.clone()).ok();
            }
            (Value::BulkString(name), Value::BulkString(value)) if name == b"job" => {
                job = Some(value.clone())
            }
            _ => {}
        }
    }
    Some((key?, job?))
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// The milliseconds of an entry id (`{ms}-{seq}`).
pub(crate) fn id_millis(id: &str) -> u64 {
    id.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_with_a_deleted_entry_reads_as_one_without_a_job() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![bulk("key"), bulk("users:1"), bulk("job"), bulk("{}")]),
            ]),
            Value::Array(vec![bulk("2-0"), Value::Nil]),
        ]);
        let read = entries(reply);
        assert_eq!(read.len(), 2);
        assert_eq!(
            read[0].job.as_ref().map(|(k, j)| (k.as_str(), j.as_slice())),
            Some(("users:1", &b"{}"[..]))
        );
        assert!(read[1].job.is_none());
        assert_eq!(id_millis("1700000000123-4"), 1_700_000_000_123);
    }
}
