//! Every option of [`#[cached]`](crate::cached), with an example that runs, and
//! the functions the attribute writes next to the one it rewrites.
//!
//! | option | what it is for |
//! |---|---|
//! | [`ttl`](#ttl) | how long an entry lives: seconds, a `Duration` expression, or a named TTL of the config |
//! | [`prefix`](#prefix-alias-key_prefix) (alias `key_prefix`) | the function's part of the key, and what `_invalidate_all` matches |
//! | [`tags`](#tags) | tags of every entry, `{arg}` interpolating an argument, for [`Cache::invalidate_tags`](crate::Cache::invalidate_tags) |
//! | [`condition`](#condition) | `Fn(&T) -> bool`: store a result only when it says so |
//! | [`key`](#key) | a key format replacing the argument list |
//! | [`skip`](#skip) | arguments left out of the key (handles, connections) |
//! | [`cache`](#cache) | a `Cache`, `&Cache` or `Arc<Cache>` instead of the global one |
//! | [`version`](#version) | part of the key: bump it when the stored type changes |
//! | [`profile`](#profile) | ttl, prefix and tags from a named profile of the config |
//! | [`cache_none`](#cache_none) | for `Option<T>`: store `None` too |
//! | [`fail_safe`](#fail_safe) | when the body fails, serve the last value (up to `fail_safe_max` after it expired) |
//! | [`near`](#near) | keep decoded values in this process in front of Redis, coherent across instances |
//! | [`early_refresh`](#early_refresh) | refresh a hot entry in the background before it expires (XFetch) |
//! | [`soft_timeout`](#soft_timeout) | serve the last value when the body takes longer, the body filling in the background |
//! | [`sensitive`](#sensitive) | encrypt the entries in Redis (`encryption_keys`) |
//! | [`crate`](#crate) | the path of `cache_runtime` when the dependency is renamed |
//!
//! Misuse is a compile error pointing at the option: an unknown one (with the
//! nearest name), a repeated one, a value of the wrong shape, a placeholder or
//! skipped name that is not an argument.
//!
//! # What it generates
//!
//! For `#[cached] async fn f(args)`, with `f`'s visibility and as associated
//! functions on methods (taking `&self` when `cache` reads `self`):
//!
//! | function | returns | what for |
//! |---|---|---|
//! | `f(args)` | what `f` returns | the cache-aside call: a hit, or the body run once per key in this process |
//! | `f_invalidate(key args)` | `Result<bool, CacheError>` | removes this entry; whether it existed |
//! | `f_invalidate_all()` | `Result<u64, CacheError>` | removes every entry under `f`'s prefix; how many |
//! | `f_key(key args)` | `String` | the key, relative to the cache's prefix, as [`Cache::get`](crate::Cache::get) and the management API take it |
//! | `f_refresh(args)` | what `f` returns | runs the body and stores its result whatever is cached (write-through) |
//!
//! `_invalidate` and `_invalidate_all` are [`Cache::delete`](crate::Cache::delete)
//! and [`Cache::delete_pattern`](crate::Cache::delete_pattern) on the function's
//! keys, with their `# Errors` and `# Cancel safety`: in particular
//! [`CacheError::Deferred`](crate::CacheError::Deferred) means the invalidation is
//! queued for Redis, not applied there yet. `f` and `f_refresh` never fail because
//! of the cache: a fault is counted and logged, and the body's result is returned.
//!
//! ```
//! use cache_runtime::cached;
//! # use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
//! # static RUNS: AtomicU32 = AtomicU32::new(0);
//!
//! #[cached(prefix = "missions")]
//! async fn mission_name(id: u32) -> String {
//!     RUNS.fetch_add(1, SeqCst);
//!     format!("mission {id}")
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), cache_runtime::CacheError> {
//! assert_eq!(mission_name(7).await, "mission 7");
//! assert_eq!(mission_name(7).await, "mission 7");
//! assert_eq!(RUNS.load(SeqCst), 1, "the second call is a hit");
//!
//! assert_eq!(mission_name_key(7), "missions:v2:7");
//! assert!(mission_name_invalidate(7).await?, "the entry existed");
//! mission_name_refresh(8).await;                 // runs the body, stores the result
//! assert_eq!(RUNS.load(SeqCst), 2);
//! assert_eq!(mission_name_invalidate_all().await?, 1, "only 8 was cached");
//! # Ok(()) }
//! ```
//!
//! # `ttl`
//!
//! Seconds, any expression giving a `Duration`, or the name of a TTL of the
//! config (`quantum_state_ttl: 30` in the settings file); without it, the
//! config's `default_ttl`. A name with no TTL configured falls back to the default
//! and logs a warning, so a typo costs freshness, not a failed call.
//!
//! ```
//! use std::time::Duration;
//! use cache_runtime::{cached, get_cache, CacheConfig, KeyTtl};
//!
//! #[cached(ttl = 60)]
//! async fn seconds() -> u32 { 1 }
//!
//! #[cached(ttl = Duration::from_millis(1500))]
//! async fn duration() -> u32 { 2 }
//!
//! #[cached(ttl = "quantum_state")]
//! async fn named() -> u32 { 3 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), cache_runtime::CacheError> {
//! let config = CacheConfig::builder().named_ttl("quantum_state", Duration::from_secs(30)).build()?;
//! cache_runtime::init(config).await?;
//! (seconds().await, duration().await, named().await);
//! let left = |key: String| async move { get_cache().ttl(&key).await };
//! assert!(matches!(left(seconds_key()).await?, KeyTtl::Expires(d) if d > Duration::from_secs(50)));
//! assert!(matches!(left(duration_key()).await?, KeyTtl::Expires(d) if d <= Duration::from_millis(1500)));
//! assert!(matches!(left(named_key()).await?, KeyTtl::Expires(d) if d > Duration::from_secs(20) && d <= Duration::from_secs(30)));
//! # Ok(()) }
//! ```
//!
//! # `prefix` (alias `key_prefix`)
//!
//! The function's segment of the key; its name by default. Renaming a function
//! then keeps its entries if the prefix stays, and `_invalidate_all` deletes
//! `{prefix}:*`, which is why a prefix may hold no glob character.
//!
//! ```
//! # use cache_runtime::cached;
//! #[cached(prefix = "missions")]
//! async fn load(id: u32) -> u32 { id }
//!
//! #[cached(key_prefix = "agents")]
//! async fn agent(id: u32) -> u32 { id }
//!
//! assert_eq!(load_key(1), "missions:v2:1");
//! assert_eq!(agent_key(1), "agents:v2:1");
//! ```
//!
//! # `tags`
//!
//! String literals; `{arg}` puts an argument's key form in the tag, so one
//! entity's entries across functions go with one
//! [`invalidate_tags`](crate::Cache::invalidate_tags).
//!
//! ```
//! # use cache_runtime::{cached, get_cache};
//! # use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
//! # static RUNS: AtomicU32 = AtomicU32::new(0);
//! #[cached(tags = ["missions", "mission:{id}"])]
//! async fn briefing(id: u32) -> String {
//!     RUNS.fetch_add(1, SeqCst);
//!     format!("briefing {id}")
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), cache_runtime::CacheError> {
//! briefing(1).await;
//! briefing(2).await;
//! assert_eq!(get_cache().invalidate_tags(["mission:1"]).await?, 1);
//! briefing(1).await; // computed again
//! briefing(2).await; // still cached
//! assert_eq!(RUNS.load(SeqCst), 3);
//! # Ok(()) }
//! ```
//!
//! # `condition`
//!
//! A path or closure taking the stored value (`&T`, the `T` of `Result<T, E>` or
//! `Option<T>`) and saying whether to store it: partial or placeholder results
//! are returned without being cached.
//!
//! ```
//! # use cache_runtime::{cached, get_cache};
//! #[cached(condition = |v: &Vec<u32>| !v.is_empty())]
//! async fn queue(name: String) -> Vec<u32> {
//!     if name == "empty" { vec![] } else { vec![1, 2] }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), cache_runtime::CacheError> {
//! assert!(queue("empty".into()).await.is_empty());
//! assert!(!get_cache().exists(&queue_key("empty".into())).await?);
//! queue("high".into()).await;
//! assert!(get_cache().exists(&queue_key("high".into())).await?);
//! # Ok(()) }
//! ```
//!
//! # `key`
//!
//! A format replacing the argument list: literal text and `{arg}` placeholders,
//! in any order, using only the arguments that make results differ. The
//! companions then take only the arguments the format names, in the order it
//! names them.
//!
//! ```
//! # use cache_runtime::cached;
//! #[cached(prefix = "queue", key = "{priority}:{id}")]
//! async fn queued(id: u32, priority: String, trace_id: u64) -> u32 { id }
//!
//! assert_eq!(queued_key("high".into(), 7), "queue:v2:high:7");
//! ```
//!
//! # `skip`
//!
//! Arguments that are not part of the key, written `skip = [a, b]` or
//! `skip(a, b)`: handles, connections, loggers, which need not be `Serialize`
//! and must not make keys differ. The companions that don't run the body
//! (`_invalidate`, `_key`) don't take them.
//!
//! ```
//! # use cache_runtime::cached;
//! struct Db;
//!
//! #[cached(skip = [db])]
//! async fn mission(id: u32, db: &Db) -> u32 { id }
//!
//! #[cached(skip(db))]
//! async fn agent(id: u32, db: &Db) -> u32 { id }
//!
//! assert_eq!(mission_key(4), "mission:v2:4");
//! assert_eq!(agent_key(4), "agent:v2:4");
//! ```
//!
//! # `cache`
//!
//! An expression giving a `Cache`, `&Cache` or `Arc<Cache>`, evaluated per call:
//! a service holding its own cache (tests, several prefixes in one process) does
//! not depend on the global one. On a method it may read `self`; the companions
//! then take `&self` too. The receiver is never part of the key.
//!
//! ```
//! # use cache_runtime::{cached, Cache, CacheConfig};
//! struct Missions {
//!     cache: Cache,
//! }
//!
//! impl Missions {
//!     #[cached(cache = self.cache, prefix = "missions")]
//!     async fn name(&self, id: u32) -> String {
//!         format!("mission {id}")
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), cache_runtime::CacheError> {
//! let config = CacheConfig::builder().key_prefix("svc").build()?;
//! let missions = Missions { cache: Cache::local(config) };
//! missions.name(3).await;
//! assert_eq!(missions.cache.get::<String>(&missions.name_key(3)).await?.as_deref(), Some("mission 3"));
//! assert!(missions.name_invalidate(3).await?);
//! # Ok(()) }
//! ```
//!
//! # `version`
//!
//! A whole number added to the key (`v{wire}.{version}`). Entries of a changed
//! type are misses anyway (the type's fingerprint is checked), but only for types
//! whose shape can be traced; bumping the version moves every replica to fresh
//! keys at once and leaves the old ones to expire.
//!
//! ```
//! # use cache_runtime::cached;
//! #[cached(version = 2)]
//! async fn evaluate(id: u32, stage: String) -> bool { true }
//!
//! assert_eq!(evaluate_key(7, "launch".into()), "evaluate:v2.2:7:launch");
//! ```
//!
//! # `profile`
//!
//! The TTL, prefix and tags of a named profile of the config (`profiles:` in
//! the settings file, or a named TTL, which is a profile with that TTL and its
//! name as prefix), so operators tune a family of functions in one place.
//! A `ttl` or `prefix` written on the function wins over the profile's; the
//! profile's tags are added to the function's.
//!
//! ```
//! use std::time::Duration;
//! use cache_runtime::{cached, get_cache, CacheConfig, KeyTtl, Profile};
//!
//! #[cached(profile = "api_response")]
//! async fn mission_page(page: u32) -> String { format!("page {page}") }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), cache_runtime::CacheError> {
//! let profile = Profile { ttl: Some(Duration::from_secs(30)), prefix: Some("api".into()), tags: vec!["api".into()] };
//! cache_runtime::init(CacheConfig::builder().profile("api_response", profile).build()?).await?;
//! mission_page(1).await;
//! assert_eq!(mission_page_key(1), "api:v2:1");
//! assert!(matches!(get_cache().ttl("api:v2:1").await?, KeyTtl::Expires(d) if d <= Duration::from_secs(30)));
//! assert_eq!(get_cache().invalidate_tags(["api"]).await?, 1);
//! # Ok(()) }
//! ```
//!
//! # `cache_none`
//!
//! An `Option<T>` function stores only `Some` by default, so an entity created
//! after a lookup missed it is found on the next call. `cache_none = true`
//! stores `None` too, for lookups that are expensive and whose absence is stable.
//!
//! ```
//! # use cache_runtime::{cached, get_cache};
//! # use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
//! # static RUNS: AtomicU32 = AtomicU32::new(0);
//! #[cached(cache_none = true)]
//! async fn find(name: String) -> Option<u32> {
//!     RUNS.fetch_add(1, SeqCst);
//!     None
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! assert_eq!(find("ghost".into()).await, None);
//! assert_eq!(find("ghost".into()).await, None);
//! assert_eq!(RUNS.load(SeqCst), 1, "the None was cached");
//! # }
//! ```
//!
//! # `fail_safe`
//!
//! `fail_safe = true` keeps each entry `fail_safe_max` past its TTL: when
//! the body of an expired key fails (an `Err`, a panic, running past
//! `hard_timeout`), the last value is returned instead, and the body is tried
//! again after `fail_safe_throttle`. An invalidation removes the entry, so
//! nothing invalidated is ever served. `fail_safe: true` in the config turns
//! it on for every function (the README's "Fail-safe").
//!
//! ```
//! # use cache_runtime::cached;
//! # #[derive(Clone, serde::Serialize, serde::Deserialize)]
//! # pub struct Quote { cents: u32 }
//! #[cached(fail_safe = true, ttl = 30)]
//! async fn quote(symbol: String) -> Result<Quote, String> {
//!     Ok(Quote { cents: 12_300 }) // a call to a flaky upstream
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! assert_eq!(quote("ACME".into()).await.map(|q| q.cents), Ok(12_300));
//! # }
//! ```
//!
//! # `near`
//!
//! `near = true` keeps this function's values decoded in the process, in
//! front of Redis: a hit there skips the network. Every invalidation any
//! instance makes is published over Redis pub/sub before it returns `Ok`, and
//! every near tier drops what it covers when the message arrives; while an
//! instance can't hear them, its near tier serves nothing (the README's
//! "Several instances"). `near = false` keeps a function out of it whatever
//! the config says. `near_cache: true` in the
//! config turns it on for every function. In local mode there is nothing to
//! be near to, and the option changes nothing.
//!
//! ```
//! # use cache_runtime::cached;
//! # #[derive(Clone, serde::Serialize, serde::Deserialize)]
//! # pub struct Rules { max: u32 }
//! #[cached(near = true, ttl = 60, tags = ["policies"])]
//! async fn policy_rules() -> Rules {
//!     Rules { max: 3 }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! assert_eq!(policy_rules().await.max, 3);
//! # }
//! ```
//!
//! # `early_refresh`
//!
//! `early_refresh = true` stamps each entry with how long its body took; a
//! hit near the entry's expiry may then refresh it in a task of its own
//! (XFetch: the nearer the expiry and the slower the body, the likelier),
//! while it returns the value it found. Hot keys are refreshed before they
//! expire, so their callers never wait for the body. The body runs once per
//! process and once across the fleet, under the same fence as a fill. The
//! task outlives the call: the function takes owned arguments (an `Arc` for
//! shared state) and is not a method, which the attribute checks.
//! `early_refresh_beta` in the config tunes how early.
//!
//! ```
//! # use cache_runtime::cached;
//! #[cached(early_refresh = true, ttl = 60)]
//! async fn exchange_rate(currency: String) -> u64 {
//!     1_085 // a slow upstream
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! assert_eq!(exchange_rate("EUR".into()).await, 1_085);
//! # }
//! ```
//!
//! # `soft_timeout`
//!
//! `soft_timeout = Duration::from_millis(200)` (or whole seconds) makes the
//! function fail-safe, and also serves its last value when the body merely
//! takes longer than that: the body goes on in a task of its own and fills.
//! A key invalidated since the read waits for its body. Like
//! `early_refresh`, it needs owned arguments.
//!
//! ```
//! # use cache_runtime::cached;
//! # use std::time::Duration;
//! #[cached(soft_timeout = Duration::from_millis(200), ttl = 30)]
//! async fn stock_level(sku: u64) -> Result<u32, String> {
//!     Ok(12) // an upstream that is sometimes slow
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! assert_eq!(stock_level(7).await, Ok(12));
//! # }
//! ```
//!
//! # `sensitive`
//!
//! `sensitive = true` encrypts this function's entries before they reach
//! Redis, under the config's `encryption_keys` (the README's "Encrypted
//! entries"). On a cache without keys its calls bypass Redis rather than
//! write in the clear. It covers this function's calls in processes that
//! call it; `sensitive_prefixes` in the config covers a prefix everywhere,
//! `Cache::set` and warm-ups included.
//!
//! ```
//! # use cache_runtime::cached;
//! #[cached(sensitive = true, ttl = 300, prefix = "profiles")]
//! async fn profile_email(user: u64) -> String {
//!     "carol@example.com".to_owned()
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! assert_eq!(profile_email(1).await, "carol@example.com");
//! # }
//! ```
//!
//! # `crate`
//!
//! The expansion names `::cache_runtime`; a crate that renamed the dependency
//! (`rt = { package = "cache-runtime", .. }`) or re-exports it gives the path,
//! as a string or a path.
//!
//! ```
//! extern crate cache_runtime as rt;
//!
//! #[rt::cached(crate = "::rt")]
//! async fn answer() -> u32 { 42 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! assert_eq!(answer().await, 42);
//! assert_eq!(answer_key(), "answer:v2");
//! # }
//! ```
