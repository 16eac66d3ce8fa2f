#![cfg(feature = "yaml")]
//! The shipped `config/settings.yaml` loads, and file errors name the file.

use std::time::Duration;

use cache_runtime::{CacheConfig, CacheError, Serialization};

const SETTINGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/settings.yaml");

#[test]
fn the_shipped_settings_file_loads() {
    let config = CacheConfig::from_settings_file(SETTINGS).unwrap();
    assert_eq!(config.redis().unwrap().to_string(), "redis://redis:6379/0");
    assert_eq!(config.key_prefix(), "nb");
    assert_eq!(config.serialization(), Serialization::Json);
    assert_eq!(config.default_ttl(), Duration::from_secs(3600));
    assert_eq!(config.named_ttl("api_response"), Some(Duration::from_secs(900)));
    assert_eq!(config.max_connections(), 50);
    assert!(config.retry_on_timeout() && config.warmup_enabled() && config.circuit_breaker_enabled());
}

#[test]
fn a_missing_file_is_named() {
    let err = CacheConfig::from_settings_file("/nonexistent/settings.yaml").unwrap_err();
    assert!(matches!(&err, CacheError::Settings { path, .. } if path.contains("nonexistent")), "{err}");
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
    assert!(err.to_string().contains("REDIS.profiles.p.colour") && err.to_string().contains("red"), "{err}");
}
