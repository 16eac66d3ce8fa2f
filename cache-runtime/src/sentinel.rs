//! Redis Sentinel: every connect asks the sentinels where the master is now.
//!
//! Nothing is cached between connects: a connection is made after the old one
//! failed (the master died, or was demoted and answered READONLY, which
//! poisons it), which is exactly when the answer may have changed. The
//! master named is then asked for its role, since a sentinel cut off from the
//! others may still name the old one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo, RedisError};

use crate::config::RedisTarget;
use crate::conn::Endpoint;
use crate::CacheError;

/// The sentinels of one master, and its name.
pub(crate) struct Sentinels {
    addrs: Vec<(String, u16)>,
    master_name: String,
    /// The sentinel that answered last, asked first next time.
    last: AtomicUsize,
}

impl Sentinels {
    /// Reads `redis+sentinel://[user:password@]host:port[,host:port…]/master_name[/db]`
    /// (`rediss+sentinel://` for TLS to the sentinels and the master). The
    /// credentials and the database are the master's; the connection info
    /// returned carries them, with an address that is not used.
    pub(crate) fn parse(url: &str) -> Result<(Sentinels, ConnectionInfo), CacheError> {
        let shown = RedisTarget::url(url);
        let refused = |key: &str, reason: &str| CacheError::config(key, &shown, reason);
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let (auth, rest) = match rest.rfind('@') {
            Some(at) => (&rest[..=at], &rest[at + 1..]),
            None => ("", rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut addrs = Vec::new();
        for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            let (name, port) = host
                .rsplit_once(':')
                .and_then(|(name, port)| Some((name.trim_matches(['[', ']']), port.parse::<u16>().ok()?)))
                .ok_or_else(|| refused("sentinels", "each sentinel is `host:port`"))?;
            addrs.push((name.to_owned(), port));
        }
        if addrs.is_empty() {
            return Err(refused("sentinels", "names no sentinel: give at least one `host:port`"));
        }
        let mut path = path.split('/');
        let master_name = path.next().unwrap_or_default();
        if master_name.is_empty() {
            return Err(refused(
                "master_name",
                "is missing: name the master the sentinels watch (`redis+sentinel://host:port/master_name`)",
            ));
        }
        let db = path.next().filter(|db| !db.is_empty()).unwrap_or("0");
        // redis-rs reads (and percent-decodes) the master's credentials and database.
        let plain = if scheme.starts_with("rediss") { "rediss" } else { "redis" };
        let info = format!("{plain}://{auth}sentinel-master/{db}").into_connection_info()?;
        Ok((Sentinels { addrs, master_name: master_name.to_owned(), last: AtomicUsize::new(0) }, info))
    }

    /// The address the sentinels give for the master, asking each in turn
    /// (the one that answered last first), each for a share of `timeout`.
    pub(crate) async fn master(
        &self,
        endpoint: &Endpoint,
        timeout: Duration,
    ) -> Result<(String, u16), CacheError> {
        let first = self.last.load(Ordering::Relaxed);
        let share = timeout / (self.addrs.len() as u32 + 1);
        let mut last_error = None;
        for i in 0..self.addrs.len() {
            let index = (first + i) % self.addrs.len();
            let (host, port) = &self.addrs[index];
            let asked = tokio::time::timeout(share, self.ask(endpoint, host, *port)).await;
            match asked {
                Ok(Ok(Some(master))) => {
                    self.last.store(index, Ordering::Relaxed);
                    return Ok(master);
                }
                Ok(Ok(None)) => {
                    last_error = Some(CacheError::config(
                        "master_name",
                        &self.master_name,
                        format!("sentinel {host}:{port} watches no master of that name"),
                    ));
                }
                Ok(Err(e)) => {
                    tracing::debug!(sentinel = %format!("{host}:{port}"), error = %e, "a sentinel did not answer");
                    last_error = Some(e);
                }
                Err(_) => last_error = Some(CacheError::Timeout(share)),
            }
        }
        Err(last_error.unwrap_or_else(|| CacheError::Unavailable("no sentinel answered".into())))
    }

    /// `SENTINEL GET-MASTER-ADDR-BY-NAME` on one sentinel: `None` when it
    /// watches no master of that name.
    async fn ask(
        &self,
        endpoint: &Endpoint,
        host: &str,
        port: u16,
    ) -> Result<Option<(String, u16)>, CacheError> {
        // Sentinels take no SELECT and no CLIENT SETINFO.
        let plain = RedisConnectionInfo::default().set_skip_set_lib_name();
        let (mut conn, driver) = endpoint.open_at(host, port, &plain, AsyncConnectionConfig::new()).await?;
        let asked = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.master_name)
            .query_async::<Option<(String, u16)>>(&mut conn)
            .await;
        driver.abort();
        Ok(asked?)
    }

    /// Whether the server at `host:port` says it is a master: a sentinel cut
    /// off from the others may still name one that was demoted.
    pub(crate) async fn check_master(
        &self,
        conn: &MultiplexedConnection,
        host: &str,
        port: u16,
    ) -> Result<(), CacheError> {
        // INFO rather than ROLE: the cache's ACL user needs INFO already.
        let info: String = redis::cmd("INFO").arg("replication").query_async(&mut conn.clone()).await?;
        if info.lines().any(|l| l.trim() == "role:master") {
            return Ok(());
        }
        let demoted = format!(
            "the sentinels name {host}:{port} master of `{}`, but it is a replica: waiting for them to agree",
            self.master_name
        );
        Err(RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, demoted)).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sentinels_master_name_credentials_and_db() {
        let (s, info) =
            Sentinels::parse("redis+sentinel://app:p%40ss@10.0.0.1:26379,[::1]:26380/cache/3").unwrap();
        assert_eq!(s.addrs, vec![("10.0.0.1".to_owned(), 26379), ("::1".to_owned(), 26380)]);
        assert_eq!(s.master_name, "cache");
        let redis = info.redis_settings();
        assert_eq!((redis.username(), redis.password(), redis.db()), (Some("app"), Some("p@ss"), 3));

        let (s, info) = Sentinels::parse("redis+sentinel://127.0.0.1:26379/m").unwrap();
        assert_eq!((s.addrs.len(), s.master_name.as_str(), info.redis_settings().db()), (1, "m", 0));
        assert_eq!(info.redis_settings().password(), None);
    }

    #[test]
    fn a_missing_master_name_or_sentinel_is_named() {
        let err = Sentinels::parse("redis+sentinel://:hunter2@127.0.0.1:26379")
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`master_name`") && !err.contains("hunter2"), "{err}");
        let err = Sentinels::parse("redis+sentinel:///m").map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("`sentinels`"), "{err}");
        let err =
            Sentinels::parse("redis+sentinel://host-without-port/m").map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("`sentinels`"), "{err}");
    }
}
