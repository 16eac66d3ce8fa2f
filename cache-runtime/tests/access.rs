//! Credentials and ACL permissions: refused at start with the cause, reported
//! once (and in `health`) when they change while the cache runs.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_runtime::{Cache, CacheConfig, CacheError, Job, Mode};
use support::{unique_prefix, Redis};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

const ADMIN_PASSWORD: &str = "admin-pw-7f3a";

fn config(url: &str, prefix: &str) -> CacheConfig {
    CacheConfig::builder()
        .redis_url(url)
        .key_prefix(prefix)
        .health_check_interval(Duration::from_millis(100))
        .circuit_breaker_timeout(Duration::from_millis(300))
        .build()
        .unwrap()
}

async fn acl(redis: &Redis, args: &[&str]) {
    let mut raw = redis.raw().await;
    let _: () = redis::cmd("ACL").arg("SETUSER").arg(args).query_async(&mut raw).await.unwrap();
}

/// Error events, with their fields, seen while the guard lives.
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> Layer<S> for Errors {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        struct Fields(String);
        impl Visit for Fields {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={value:?} ", field.name()));
            }
        }
        if *event.metadata().level() == tracing::Level::ERROR {
            let mut fields = Fields(String::new());
            event.record(&mut fields);
            self.0.lock().unwrap().push(fields.0);
        }
    }
}

impl Errors {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    fn seen(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn a_wrong_or_missing_password_is_an_error_that_says_so() {
    let redis = Redis::spawn_with_password(Some(ADMIN_PASSWORD));
    let prefix = unique_prefix("auth");

    let wrong = Cache::new(config(&redis.url_as("default", "not-the-password"), &prefix)).await.unwrap_err();
    let message = wrong.to_string();
    assert!(matches!(wrong, CacheError::Auth(_)), "{wrong:?}");
    assert!(message.contains("refused authentication"), "{message}");
    assert!(!message.contains("not-the-password"), "the password is never printed: {message}");
    assert!(!message.contains("check that Redis is running"), "{message}");

    let url = format!("redis://127.0.0.1:{}/0", redis.port());
    let missing = Cache::new(config(&url, &prefix)).await.unwrap_err();
    assert!(matches!(missing, CacheError::Auth(_)), "{missing:?}");
    assert!(missing.to_string().contains("NOAUTH"), "{missing}");

    // Control: the right password reaches redis mode and a healthy check.
    let cache = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
    assert_eq!(cache.health().await.status, "healthy");

    // Only an unreachable Redis falls back to local mode.
    let nobody = format!("redis://127.0.0.1:{}/0", support_free_port());
    let fallback = Cache::new(config(&nobody, &prefix)).await.unwrap();
    assert_eq!(fallback.mode(), Mode::Local);
}

fn support_free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The commands of the README's least-privilege ACL line.
fn documented_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let line = readme.lines().find(|l| l.starts_with("ACL SETUSER app on")).expect("the README's ACL line");
    line.split_whitespace().filter(|t| t.starts_with('+')).map(str::to_owned).collect()
}

#[tokio::test]
async fn the_documented_least_privilege_acl_is_enough() {
    let redis = Redis::spawn();
    let prefix = unique_prefix("acl");
    let (entries, internal, channels) =
        (format!("~{prefix}:*"), format!("~{prefix}#*"), format!("&{prefix}#*"));
    let mut user =
        vec!["app", "on", ">app-pw", "resetkeys", "resetchannels", &entries, &internal, &channels, "-@all"];
    let commands = documented_commands();
    user.extend(commands.iter().map(String::as_str));
    acl(&redis, &user).await;
    let cache = Cache::new(config(&redis.url_as("app", "app-pw"), &prefix)).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
    cache.set("missions:1", &"one").tags(["missions"]).await.unwrap();
    assert_eq!(cache.get::<String>("missions:1").await.unwrap().as_deref(), Some("one"));
    assert_eq!(cache.invalidate_tags(["missions"]).await.unwrap(), 1);
    cache.set("missions:2", &"two").await.unwrap();
    assert_eq!(cache.delete_pattern("missions:*").await.unwrap(), 1);
    cache.set("missions:3", &"three").await.unwrap();
    assert!(cache.delete("missions:3").await.unwrap());
    assert_eq!(cache.clear().await.unwrap(), 0);
    let stats = cache.stats().await.unwrap();
    assert!(stats.connected && stats.redis_version.is_some());
    assert_eq!(cache.health().await.status, "healthy");
    assert_eq!(cache.stats().await.unwrap().errors, 0);

    // Write-behind under the same user: a job applied and acknowledged, one
    // the handler can't read dead-lettered, the queue's figures read.
    let applied = Arc::new(AtomicU32::new(0));
    let counter = applied.clone();
    let flusher = cache
        .write_behind_flusher(move |_: Job<u32>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<(), String>(())
            }
        })
        .start()
        .unwrap();
    assert!(cache.write_behind("missions:4", "four", &4u32).await.unwrap().is_done());
    assert!(cache.write_behind("missions:5", "five", "not a number").await.unwrap().is_done());
    support::eventually("the queue drained", || async {
        let stats = cache.stats().await.unwrap();
        stats.write_behind_queue_length == 0 && stats.write_behind_dead_letters == 1
    })
    .await;
    assert_eq!(applied.load(Ordering::SeqCst), 1);
    flusher.shutdown().await;

    // Control: one documented command fewer is caught at start.
    let (dropped, rest) = commands.split_last().unwrap();
    let mut short = vec!["short", "on", ">pw", &entries, &internal, &channels, "-@all"];
    short.extend(rest.iter().map(String::as_str));
    acl(&redis, &short).await;
    let err = Cache::new(config(&redis.url_as("short", "pw"), &prefix)).await.unwrap_err();
    let name = dropped.trim_start_matches('+').to_uppercase();
    assert!(err.to_string().contains(&name), "{dropped} missing: {err}");
}

#[tokio::test]
async fn a_missing_key_pattern_or_command_is_named_at_start() {
    let redis = Redis::spawn();
    let prefix = unique_prefix("noperm");

    // Entries only: the epoch and tag index under `{prefix}#` are out of reach.
    acl(&redis, &["entries", "on", ">pw", &format!("~{prefix}:*"), "+@all"]).await;
    let err = Cache::new(config(&redis.url_as("entries", "pw"), &prefix)).await.unwrap_err();
    assert!(matches!(err, CacheError::Permission { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&format!("`{prefix}#*`")), "names the internal keys: {message}");

    // No scripting at all.
    acl(&redis, &["noscript", "on", ">pw", "allkeys", "allchannels", "+@all", "-@scripting"]).await;
    let err = Cache::new(config(&redis.url_as("noscript", "pw"), &prefix)).await.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, CacheError::Permission { .. }), "{err:?}");
    assert!(message.contains("SCRIPT|LOAD") || message.contains("EVALSHA"), "{message}");
    assert!(!message.contains("check that Redis is running"), "{message}");

    // Scripts allowed, but not a command they call.
    acl(&redis, &["nozadd", "on", ">pw", "allkeys", "allchannels", "+@all", "-zadd"]).await;
    let err = Cache::new(config(&redis.url_as("nozadd", "pw"), &prefix)).await.unwrap_err();
    assert!(err.to_string().contains("run ZADD inside the cache's Lua scripts"), "{err}");

    // A command used outside scripts.
    acl(&redis, &["noscan", "on", ">pw", "allkeys", "allchannels", "+@all", "-scan"]).await;
    let err = Cache::new(config(&redis.url_as("noscan", "pw"), &prefix)).await.unwrap_err();
    assert!(err.to_string().contains("may not run SCAN"), "{err}");

    // The probe left nothing behind.
    let mut raw = redis.raw().await;
    let left: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut raw).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_permission_revoked_later_is_logged_once_shown_by_health_and_cleared() {
    let redis = Redis::spawn();
    let prefix = unique_prefix("revoke");
    let user = ["app", "on", ">pw", "allkeys", "allchannels", "+@all"];
    acl(&redis, &user).await;
    let cache = Cache::new(config(&redis.url_as("app", "pw"), &prefix)).await.unwrap();
    assert_eq!(cache.health().await.status, "healthy");

    let errors = Errors::default();
    let _guard = errors.install();
    acl(&redis, &["app", "-@scripting"]).await;
    for i in 0..20 {
        let err = cache.delete(&format!("k{i}")).await.unwrap_err();
        assert!(matches!(err, CacheError::Permission { .. }), "{err:?}");
    }
    let health = cache.health().await;
    assert_eq!(health.status, "unhealthy");
    assert!(health.error.as_deref().unwrap().contains("EVALSHA"), "{health:?}");
    assert_eq!(cache.mode(), Mode::Redis, "a refused command is not an outage");
    let logged = errors.seen();
    assert_eq!(logged.len(), 1, "one error log for 20 refused calls: {logged:?}");
    let counted = cache.metrics().render();
    let counted: u64 = counted
        .lines()
        .find_map(|l| l.strip_prefix("cache_config_errors_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(counted >= 20, "every refused call is counted: {counted}");

    // Restored: the health loop's access check clears the cause.
    acl(&redis, &["app", "+@all"]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while cache.health().await.status != "healthy" {
        assert!(tokio::time::Instant::now() < deadline, "health never recovered: {:?}", cache.health().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cache.delete("k0").await.is_ok());
}

#[tokio::test]
async fn a_rotated_password_is_reported_once_and_never_printed() {
    let redis = Redis::spawn_with_password(Some(ADMIN_PASSWORD));
    let prefix = unique_prefix("rotate");
    let cache = Cache::new(config(redis.url(), &prefix)).await.unwrap();
    let errors = Errors::default();
    let _guard = errors.install();

    let mut raw = redis.raw().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("rotated-pw-91c2")
        .query_async(&mut raw)
        .await
        .unwrap();
    // Existing connections stay authenticated; a reconnect is what meets the new password.
    let _: redis::Value =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal").query_async(&mut raw).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let _ = cache.get::<String>("anything").await;
        let health = cache.health().await;
        if health.status == "unhealthy" {
            let cause = health.error.unwrap();
            assert!(cause.contains("refused authentication"), "{cause}");
            assert!(!cause.contains(ADMIN_PASSWORD), "{cause}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never reported: {health:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logged = errors.seen();
    assert_eq!(logged.len(), 1, "reconnect attempts log the cause once: {logged:?}");
    assert!(logged.iter().all(|l| !l.contains(ADMIN_PASSWORD) && !l.contains("rotated-pw-91c2")));
}

#[tokio::test]
async fn a_user_refused_publish_starts_with_the_bus_off() {
    let redis = Redis::spawn();
    let prefix = unique_prefix("nopub");
    acl(&redis, &["nopub", "on", ">pw", "allkeys", "resetchannels", "+@all"]).await;
    let cache = Cache::new(config(&redis.url_as("nopub", "pw"), &prefix)).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
    cache.set("k", &1u32).await.unwrap();
    assert!(cache.delete("k").await.unwrap(), "invalidations work without the bus");
    let stats = cache.stats().await.unwrap();
    assert!(!stats.bus_listening && stats.errors == 0, "{stats:?}");
    assert_eq!(cache.health().await.status, "healthy");
    let err = cache.emit("e", ()).await.unwrap_err();
    assert!(err.to_string().contains("PUBLISH"), "{err}");
}
