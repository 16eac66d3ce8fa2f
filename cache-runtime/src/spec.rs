//! What the macro knows of one cached function: its name, key prefix, TTL,
//! profile and version, and how the cache's configuration resolves them.

use std::time::Duration;

use crate::{Cache, IntoTtl};

/// A `ttl = ...` option.
#[derive(Debug, Clone, Copy)]
pub enum TtlSpec {
    /// A fixed duration.
    Fixed(Duration),
    /// A TTL looked up by name in the configuration (`quantum_state_ttl: 300`).
    Named(&'static str),
}

/// Converts a `ttl = ...` expression.
pub fn ttl(v: impl IntoTtl) -> TtlSpec {
    TtlSpec::Fixed(v.into_ttl())
}

/// Converts a `soft_timeout = ...` expression.
pub fn duration(v: impl IntoTtl) -> Duration {
    v.into_ttl()
}

/// Static description of one cached function.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The function's name.
    pub name: &'static str,
    /// The `prefix` option.
    pub prefix: Option<&'static str>,
    /// The `ttl` option.
    pub ttl: Option<TtlSpec>,
    /// The `profile` option.
    pub profile: Option<&'static str>,
    /// The `version` option.
    pub version: u32,
    /// The `near` option: `Some(true)` keeps this function's values in the
    /// near tier too, `Some(false)` never, `None` as the cache's `near_cache` says.
    pub near: Option<bool>,
    /// The `fail_safe` option: `Some(true)` serves the last value when the
    /// body fails, `Some(false)` never, `None` as the cache's `fail_safe` says.
    pub fail_safe: Option<bool>,
    /// The `early_refresh` option: a hit near its entry's expiry may refresh
    /// it in the background (XFetch), so that callers keep hitting.
    pub early_refresh: bool,
    /// The `soft_timeout` option: how long a caller waits for a body while a
    /// last value (fail-safe) could be served, the body going on in the background.
    pub soft_timeout: Option<Duration>,
    /// The `sensitive` option: entries are encrypted in Redis (`encryption_keys`).
    pub sensitive: bool,
}

impl Spec {
    /// The spec of `name` with every option unset, for specs written by hand.
    pub const fn named(name: &'static str) -> Spec {
        Spec {
            name,
            prefix: None,
            ttl: None,
            profile: None,
            version: 0,
            near: None,
            fail_safe: None,
            early_refresh: false,
            soft_timeout: None,
            sensitive: false,
        }
    }

    /// This spec with the `prefix` option set.
    pub const fn with_prefix(mut self, prefix: &'static str) -> Spec {
        self.prefix = Some(prefix);
        self
    }

    pub(crate) fn prefix<'a>(&'a self, cache: &'a Cache) -> &'a str {
        if let Some(prefix) = self.prefix {
            return prefix;
        }
        if let Some(name) = self.profile {
            let config = cache.config();
            if let Some(profile) = config.profiles.get(name) {
                return profile.prefix.as_deref().unwrap_or(self.name);
            }
            if config.named_ttls.contains_key(name) {
                return name;
            }
        }
        self.name
    }

    pub(crate) fn ttl(&self, cache: &Cache) -> Duration {
        let config = cache.config();
        let named = |name: &str| {
            config.named_ttl(name).unwrap_or_else(|| {
                tracing::warn!(function = self.name, ttl = name, "no such named TTL: using the default TTL");
                config.default_ttl
            })
        };
        match self.ttl {
            Some(TtlSpec::Fixed(d)) => d,
            Some(TtlSpec::Named(name)) => named(name),
            None => match self.profile {
                Some(p) => config.profiles.get(p).and_then(|p| p.ttl).unwrap_or_else(|| named(p)),
                None => config.default_ttl,
            },
        }
    }

    /// Whether this function's calls use the near tier: its own option, else the cache's `near_cache`.
    #[inline]
    pub(crate) fn near(&self, cache: &Cache) -> bool {
        self.near.unwrap_or_else(|| cache.config().near_cache())
    }

    /// Whether this function's calls are fail-safe: its own option, else
    /// on with a soft timeout (which serves the last value), else the cache's `fail_safe`.
    #[inline]
    pub(crate) fn fail_safe(&self, cache: &Cache) -> bool {
        self.fail_safe.unwrap_or_else(|| self.soft_timeout.is_some() || cache.config().fail_safe())
    }

    /// Whether this function's entries carry a stamp (`codec.rs`): fail-safe
    /// ones, for their expiry, and early-refreshed ones, for the body's time too.
    #[inline]
    pub(crate) fn stamped(&self, cache: &Cache) -> bool {
        self.early_refresh || self.fail_safe(cache)
    }

    pub(crate) fn tags(&self, cache: &Cache, mut tags: Vec<String>) -> Vec<String> {
        if let Some(profile) = self.profile.and_then(|p| cache.config().profiles.get(p)) {
            tags.extend(profile.tags.iter().cloned());
        }
        tags
    }
}
