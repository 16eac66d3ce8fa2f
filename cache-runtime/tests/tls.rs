//! `rediss://` against a real `redis-server` with a TLS port: a CA of the
//! test's own, mutual TLS, a CA that signed nothing, skipping verification,
//! and PEM files that can't be used.

mod support;

use support::load;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cache_runtime::{Cache, CacheConfig, CacheConfigBuilder, CacheError, Mode};
use support::tls::TlsRedis;

/// Short enough that a refused or closed session fails the test fast.
fn quick(builder: CacheConfigBuilder) -> CacheConfig {
    builder
        .socket_connect_timeout(Duration::from_secs(2))
        .health_check_interval(Duration::from_millis(100))
        .circuit_breaker_timeout(Duration::from_millis(300))
        .build()
        .unwrap()
}

async fn raw_keys(server: &TlsRedis, pattern: &str) -> Vec<String> {
    let mut raw = server.redis.raw().await;
    redis::cmd("KEYS").arg(pattern).query_async(&mut raw).await.unwrap()
}

#[tokio::test]
async fn hits_fills_and_invalidations_go_over_tls_to_a_server_signed_by_a_ca_of_our_own() {
    let server = TlsRedis::spawn("no");
    let config = quick(server.config("tls"));
    let prefix = config.key_prefix().to_owned();
    let cache = Cache::new(config).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);

    let runs = AtomicU32::new(0);
    assert_eq!(load(&cache, "a", &runs).await, "value of a");
    assert_eq!(load(&cache, "a", &runs).await, "value of a");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the second call is a hit");
    // The fill landed in this server: read back over its plain port.
    assert_eq!(raw_keys(&server, &format!("{prefix}:*")).await.len(), 1);

    assert_eq!(cache.invalidate_tags(["t"]).await.unwrap(), 1);
    assert!(raw_keys(&server, &format!("{prefix}:*")).await.is_empty());
    assert_eq!(load(&cache, "a", &runs).await, "value of a");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the invalidated entry is computed again");
    assert_eq!(cache.health().await.status, "healthy");
    let stats = cache.stats().await.unwrap();
    assert_eq!(stats.errors, 0);

    // Control: the same port without TLS answers nothing a client can use.
    let plain = format!("redis://127.0.0.1:{}/0", server.tls_port);
    let config =
        quick(CacheConfig::builder().redis_url(plain).socket_connect_timeout(Duration::from_millis(500)));
    let plain = Cache::new(config).await.unwrap();
    assert_eq!(plain.mode(), Mode::Local, "the TLS port must not take plain RESP");
}

#[tokio::test]
async fn mutual_tls_works_with_the_client_certificate_and_is_refused_without_it() {
    let server = TlsRedis::spawn("yes");
    let (cert, key) = server.certs.client();
    let cache = Cache::new(quick(server.config("mtls").tls_client_cert(&cert, &key))).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
    cache.set("k", &7u32).await.unwrap();
    assert_eq!(cache.get::<u32>("k").await.unwrap(), Some(7));

    // Without it, the server refuses the session: a misconfiguration named at start.
    let err = Cache::new(quick(server.config("mtls"))).await.unwrap_err();
    assert!(matches!(err, CacheError::Tls(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("client certificate"), "{message}");
    assert!(!message.contains("check that Redis is running"), "{message}");
}

#[tokio::test]
async fn a_client_certificate_required_later_is_reported_by_health_and_calls_fall_back() {
    let server = TlsRedis::spawn("optional");
    let cache = Cache::new(quick(server.config("mtls-later"))).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
    let runs = AtomicU32::new(0);
    load(&cache, "warm", &runs).await;
    assert_eq!(cache.health().await.status, "healthy");

    // Resumed sessions would skip the client's authentication: none are offered from now on.
    let mut raw = server.redis.raw().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("tls-auth-clients")
        .arg("yes")
        .arg("tls-session-caching")
        .arg("no")
        .query_async(&mut raw)
        .await
        .unwrap();
    let mut raw = server.redis.raw().await;
    let _: redis::Value =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal").query_async(&mut raw).await.unwrap();

    // Each call still returns its body's result while the reconnects are refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let cause = loop {
        let before = runs.load(Ordering::SeqCst);
        assert_eq!(load(&cache, "fresh", &runs).await, "value of fresh");
        assert!(runs.load(Ordering::SeqCst) <= before + 1);
        let health = cache.health().await;
        if health.status == "unhealthy" {
            break health.error.unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "never reported: {health:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(cause.contains("TLS") && cause.contains("client certificate"), "{cause}");

    // Control: the server asks for no certificate again, and the cache recovers.
    let mut raw = server.redis.raw().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("tls-auth-clients")
        .arg("optional")
        .query_async(&mut raw)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while cache.health().await.status != "healthy" || cache.mode() != Mode::Redis {
        assert!(tokio::time::Instant::now() < deadline, "never recovered: {:?}", cache.health().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cache.set("after", &1u32).await.unwrap();
    assert_eq!(cache.get::<u32>("after").await.unwrap(), Some(1));
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_verification_unless_verification_is_skipped() {
    let server = TlsRedis::spawn("no");
    let wrong = server.config("wrong-ca").tls_ca_cert(server.certs.other_ca_pem());
    let err = Cache::new(quick(wrong.clone())).await.unwrap_err();
    assert!(matches!(err, CacheError::Tls(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("invalid peer certificate") && message.contains("UnknownIssuer"), "{message}");
    assert!(message.contains("tls_ca_cert"), "says what to check: {message}");

    // Skipping verification connects all the same: for development only.
    let cache = Cache::new(quick(wrong.tls_insecure_skip_verify(true))).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
    cache.set("k", &"v").await.unwrap();
    assert_eq!(cache.get::<String>("k").await.unwrap().as_deref(), Some("v"));

    // Control: the right CA verifies.
    let cache = Cache::new(quick(server.config("right-ca"))).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
}

#[tokio::test]
async fn the_certificate_must_name_the_host_of_the_url() {
    let server = TlsRedis::spawn("no");
    // The certificate lists 127.0.0.1 and `localhost`; the IPv4-mapped IPv6
    // address reaches the same socket under another name.
    let url = format!("rediss://[::ffff:127.0.0.1]:{}/0", server.tls_port);
    let err = Cache::new(quick(server.config("name").redis_url(url))).await.unwrap_err();
    assert!(matches!(err, CacheError::Tls(_)), "{err:?}");
    assert!(err.to_string().contains("not valid for name"), "{err}");
    // Control: a name it lists.
    let url = format!("rediss://localhost:{}/0", server.tls_port);
    let cache = Cache::new(quick(server.config("name").redis_url(url))).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
}

#[tokio::test]
async fn pem_files_that_cant_be_used_are_config_errors_naming_the_setting_and_the_path() {
    let server = TlsRedis::spawn("no");
    let config = |b: CacheConfigBuilder| quick(b);
    let expect = |err: CacheError, key: &str, path: &std::path::Path| {
        let CacheError::Config { key: named, value, reason } = &err else { panic!("{err:?}") };
        assert_eq!(named, key, "{err}");
        assert_eq!(value, &path.display().to_string(), "{err}");
        reason.clone()
    };

    let missing = server.certs.path("no-such-ca.pem");
    let err = Cache::new(config(server.config("pem").tls_ca_cert(&missing))).await.unwrap_err();
    let reason = expect(err, "tls_ca_cert", &missing);
    assert!(reason.contains("could not read"), "{reason}");

    let garbage = server.certs.path("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let err = Cache::new(config(server.config("pem").tls_ca_cert(&garbage))).await.unwrap_err();
    expect(err, "tls_ca_cert", &garbage);

    // A key file's contents never reach the error.
    let (cert, _) = server.certs.client();
    let bad_key = server.certs.path("bad.key");
    std::fs::write(&bad_key, "-----BEGIN PRIVATE KEY-----\nSECRET-KEY-MATERIAL\n").unwrap();
    let err = Cache::new(config(server.config("pem").tls_client_cert(&cert, &bad_key))).await.unwrap_err();
    assert!(!format!("{err} {err:?}").contains("SECRET-KEY-MATERIAL"), "{err:?}");
    expect(err, "tls_client_key", &bad_key);

    // A certificate without its key, through the settings section.
    let section = serde_json::json!({ "url": server.url(), "tls_client_cert": cert.display().to_string() });
    let err = Cache::new(CacheConfig::from_value(section).unwrap()).await.unwrap_err();
    let reason = expect(err, "tls_client_cert", &cert);
    assert!(reason.contains("tls_client_key"), "{reason}");

    // TLS settings with a plain URL would send everything in clear: refused.
    let plain = format!("redis://127.0.0.1:{}/0", server.redis.port());
    let err = Cache::new(config(server.config("pem").redis_url(plain))).await.unwrap_err();
    assert!(matches!(&err, CacheError::Config { key, .. } if key == "url"), "{err:?}");

    // Control: the same settings with usable files connect.
    let cache = Cache::new(config(server.config("pem"))).await.unwrap();
    assert_eq!(cache.mode(), Mode::Redis);
}
