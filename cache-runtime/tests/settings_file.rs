#![cfg(feature = "yaml")]
//! Settings files on disk, settings trees an app loaded itself, and the
//! environment over them: what loads, what is refused, and what errors say.

use std::path::PathBuf;
use std::time::Duration;

use cache_runtime::{CacheConfig, CacheError, Serialization};
use serde_json::json;

const SETTINGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/settings.yaml");
const DESIGN_SETTINGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/design_settings.yaml");

/// Writes `yaml` to a file of its own, so each test reads a real file.
fn settings_file(name: &str, yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cache-runtime-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn the_shipped_settings_file_loads() {
    let config = CacheConfig::from_settings_file(SETTINGS).unwrap();
    assert_eq!(config.redis().unwrap().to_string(), "redis://redis:6379/0");
    assert_eq!(config.key_prefix(), "nb");
    assert_eq!(config.serialization(), Serialization::Json);
    assert_eq!(config.default_ttl(), Duration::from_secs(3600));
    assert_eq!(config.named_ttl("api_response"), Some(Duration::from_secs(900)));
    assert_eq!(config.max_connections(), 50);
    assert_eq!(config.operation_timeout(), Duration::from_millis(250));
    assert!(config.retry_on_timeout() && config.warmup_enabled() && config.circuit_breaker_enabled());
}

#[test]
fn the_design_documents_settings_file_loads_as_written() {
    let config = CacheConfig::from_settings_file(DESIGN_SETTINGS).unwrap();
    assert_eq!(config.redis().unwrap().to_string(), "redis://redis:6379/0");
    assert_eq!(config.max_connections(), 50);
    assert_eq!(config.socket_timeout(), Duration::from_secs(5));
    assert_eq!(config.socket_connect_timeout(), Duration::from_secs(5));
    assert!(config.retry_on_timeout());
    assert_eq!(config.health_check_interval(), Duration::from_secs(30));
    assert_eq!(config.default_ttl(), Duration::from_secs(3600));
    for (name, secs) in
        [("quantum_state", 300), ("multi_reality", 600), ("consciousness", 180), ("api_response", 900)]
    {
        assert_eq!(config.named_ttl(name), Some(Duration::from_secs(secs)), "{name}");
    }
    assert_eq!(config.named_ttls().len(), 4);
    let profile = config.profile("quantum_state").unwrap();
    assert_eq!(
        (profile.ttl, profile.prefix.as_deref()),
        (Some(Duration::from_secs(300)), Some("quantum_state"))
    );
    assert!(config.warmup_enabled());
    assert_eq!((config.warmup_batch_size(), config.warmup_concurrency()), (100, 5));
    assert!(config.circuit_breaker_enabled());
    assert_eq!(config.circuit_breaker_threshold(), 5);
    assert_eq!(config.circuit_breaker_timeout(), Duration::from_secs(60));
    // The socket timeout caps the per-call one, which keeps its default below it.
    assert_eq!(config.operation_timeout(), Duration::from_millis(250));
}

#[test]
fn a_missing_file_is_named() {
    let err = CacheConfig::from_settings_file("/nonexistent/settings.yaml").unwrap_err();
    assert!(matches!(&err, CacheError::Settings { path, .. } if path.contains("nonexistent")), "{err}");
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let path =
        settings_file("unknown", "APP:\n  anything: goes\nREDIS:\n  host: redis\n  max_conections: 50\n");
    let err = CacheConfig::from_settings_file(&path).unwrap_err();
    match &err {
        CacheError::Config { key, value, reason } => {
            assert_eq!(key, "REDIS.max_conections");
            // Not shown: a misspelt key may hold a secret.
            assert_eq!(value, "");
            assert!(
                reason.contains("unknown field `max_conections`") && reason.contains("max_connections"),
                "{reason}"
            );
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_bad_value_names_its_key_and_value() {
    let path = settings_file("bad_value", "REDIS:\n  host: redis\n  socket_timeout: abc\n");
    let err = CacheConfig::from_settings_file(&path).unwrap_err().to_string();
    assert!(err.starts_with("invalid configuration: `REDIS.socket_timeout` = `\"abc\"`: "), "{err}");
    assert!(err.contains("expected a positive number of seconds"), "{err}");

    let path = settings_file("bad_count", "redis:\n  connections: 0\n");
    let err = CacheConfig::from_settings_file(&path).unwrap_err().to_string();
    assert!(err.starts_with("invalid configuration: `redis.connections` = `0`: "), "{err}");

    let path = settings_file("bad_prefix", "REDIS:\n  key_prefix: \"a:b\"\n");
    let err = CacheConfig::from_settings_file(&path).unwrap_err().to_string();
    assert!(err.starts_with("invalid configuration: `REDIS.key_prefix` = `\"a:b\"`: "), "{err}");

    let path = settings_file("bad_password", "REDIS:\n  host: redis\n  password: 918273645\n");
    let err = CacheConfig::from_settings_file(&path).unwrap_err().to_string();
    assert!(err.starts_with("invalid configuration: `REDIS.password` = `***`: "), "{err}");
    assert!(!err.contains("918273645"), "{err}");
}

#[test]
fn a_profile_section_is_read_and_checked() {
    let yaml = "REDIS:\n  profiles:\n    api_response:\n      ttl: 900\n      prefix: api\n      tags: [api, responses]\n";
    let config = CacheConfig::from_settings_str(yaml).unwrap();
    let profile = config.profile("api_response").unwrap();
    assert_eq!(profile.ttl, Some(Duration::from_secs(900)));
    assert_eq!(profile.prefix.as_deref(), Some("api"));
    assert_eq!(profile.tags, ["api", "responses"]);
    let err =
        CacheConfig::from_settings_str("REDIS:\n  profiles:\n    p:\n      ttl: 1\n      colour: red\n")
            .unwrap_err();
    assert!(err.to_string().contains("REDIS.profiles.p.colour") && !err.to_string().contains("red"), "{err}");
}

#[test]
fn a_section_deserializes_from_json_as_an_app_loads_it() {
    // An app's own settings type holds the cache's section, as figment or config would fill it.
    #[derive(serde::Deserialize)]
    struct AppSettings {
        #[serde(rename = "REDIS")]
        redis: CacheConfig,
    }
    let text = r#"{"REDIS": {"url": "redis://cache.internal:6380/3", "socket_connect_timeout": 2.5,
        "serialization": "msgpack", "track_stats": false, "quantum_state_ttl": 300,
        "profiles": {"missions": {"ttl": 60, "tags": ["missions"]}}}}"#;
    let app: AppSettings = serde_json::from_str(text).unwrap();
    let config = app.redis;
    assert_eq!(config.redis().unwrap().to_string(), "redis://cache.internal:6380/3");
    assert_eq!(config.socket_connect_timeout(), Duration::from_millis(2500));
    assert_eq!(config.serialization(), Serialization::MsgPack);
    assert!(!config.track_stats());
    assert_eq!(config.named_ttl("quantum_state"), Some(Duration::from_secs(300)));
    assert_eq!(config.profile("missions").unwrap().tags, ["missions"]);

    let err = serde_json::from_str::<AppSettings>(r#"{"REDIS": {"hots": "redis"}}"#).err().unwrap();
    assert!(err.to_string().contains("unknown field `hots`"), "{err}");

    let config = CacheConfig::from_value(json!({"host": "redis", "port": 6390, "db": 1, "password": "pw",
        "default_ttl": "90", "connections": 4, "retry_on_timeout": false}))
    .unwrap();
    assert_eq!(config.redis().unwrap().to_string(), "redis://***@redis:6390/1");
    assert_eq!(config.default_ttl(), Duration::from_secs(90));
    assert_eq!(config.connections(), 4);
    assert!(!config.retry_on_timeout());
    let err = CacheConfig::from_value(json!({"port": "lots"})).unwrap_err().to_string();
    assert!(err.starts_with("invalid configuration: `port` = `\"lots\"`: "), "{err}");
}

/// The only test of this binary that touches the process environment.
#[test]
fn the_environment_overrides_a_settings_file() {
    let vars = [
        ("REDIS_HOST", "db.internal"),
        ("REDIS_PORT", "6380"),
        ("REDIS_DB", "2"),
        ("REDIS_PASSWORD", "s3cret"),
        ("CACHE_KEY_PREFIX", "env"),
        ("CACHE_DEFAULT_TTL", "60"),
        ("CACHE_SERIALIZATION", "msgpack"),
        ("CACHE_TRACK_STATS", "off"),
        ("CACHE_METRICS_NAMESPACE", "brain"),
        ("CACHE_ADMIN_TOKEN", "t0ken"),
    ];
    // A REDIS_URL pointing the suite at a server would win over REDIS_HOST.
    let preset_url = std::env::var_os("REDIS_URL");
    std::env::remove_var("REDIS_URL");
    for (name, value) in vars {
        std::env::set_var(name, value);
    }
    let config = CacheConfig::from_settings_file(SETTINGS).unwrap().with_env();
    let url = CacheConfig::from_settings_file(SETTINGS).map(|c| {
        std::env::set_var("REDIS_URL", "redis://other:6379/5");
        c.with_env()
    });
    let bad = {
        std::env::set_var("CACHE_DEFAULT_TTL", "soon");
        CacheConfig::from_env()
    };
    for (name, _) in vars {
        std::env::remove_var(name);
    }
    std::env::remove_var("REDIS_URL");
    if let Some(url) = preset_url {
        std::env::set_var("REDIS_URL", url);
    }

    let config = config.unwrap();
    assert_eq!(config.redis().unwrap().to_string(), "redis://***@db.internal:6380/2");
    assert_eq!(config.key_prefix(), "env");
    assert_eq!(config.default_ttl(), Duration::from_secs(60));
    assert_eq!(config.serialization(), Serialization::MsgPack);
    assert!(!config.track_stats());
    assert_eq!(config.metrics_namespace(), "brain");
    assert_eq!(config.admin_token(), Some("t0ken"));
    // What the environment leaves alone keeps the file's value.
    assert_eq!(config.named_ttl("api_response"), Some(Duration::from_secs(900)));
    assert_eq!(config.max_connections(), 50);

    assert_eq!(url.unwrap().unwrap().redis().unwrap().to_string(), "redis://other:6379/5");
    let err = bad.unwrap_err().to_string();
    assert!(err.starts_with("invalid configuration: `CACHE_DEFAULT_TTL` = `soon`: "), "{err}");
}
