//! The `#[cached]` attribute of `cache-runtime`. Depend on `cache-runtime`, which
//! re-exports it; this crate only rewrites code, the runtime does the work.

mod args;
mod expand;
mod format;
mod validate;

use proc_macro::TokenStream;

/// Turns an `async fn` into a cache-aside call. Use it through `cache-runtime`,
/// which re-exports it (`cache_runtime::cached`); the module
/// `cache_runtime::macro_options` has an example that runs for every option.
///
/// | option | meaning |
/// |---|---|
/// | `ttl = 300` / `ttl = Duration::from_secs(300)` / `ttl = "quantum_state"` | seconds, a `Duration` expression, or a named TTL of the config; default: the config's `default_ttl` |
/// | `prefix = "missions"` (alias `key_prefix`) | the function's key prefix, matched by `_invalidate_all`; default: its name |
/// | `tags = ["missions", "mission:{id}"]` | tags of every entry; `{arg}` interpolates an argument |
/// | `condition = path_or_closure` | `Fn(&T) -> bool` on the stored value: store it only when true |
/// | `key = "{priority}:{id}"` | replaces the argument list in the key |
/// | `skip = [db]` or `skip(db)` | arguments left out of the key (handles, connections) |
/// | `cache = self.cache` | a `Cache`, `&Cache` or `Arc<Cache>` instead of the global `get_cache()` |
/// | `version = 2` | part of the key: bump it when the stored type changes |
/// | `profile = "api_response"` | ttl, prefix and tags from a named profile of the config |
/// | `cache_none = true` | for `Option<T>`: store `None` too |
/// | `fail_safe = true` | when the body fails, serve the last value (up to `fail_safe_max` after it expired) |
/// | `near = true` | keep decoded values in this process in front of Redis, coherent across instances |
/// | `crate = "::renamed"` | the runtime's path, for a renamed dependency |
///
/// Next to `f` it generates, with `f`'s visibility (associated functions on
/// methods, taking `&self` when `cache` reads `self`):
///
/// - `f_invalidate(key args) -> Result<bool, CacheError>`: removes this entry;
/// - `f_invalidate_all() -> Result<u64, CacheError>`: removes every entry of `f`;
/// - `f_key(key args) -> String`: the key, relative to the cache's prefix;
/// - `f_refresh(args)`: runs the body and stores its result (write-through).
///
/// `Result<T, E>` stores only `Ok`, `Option<T>` only `Some` (unless
/// `cache_none = true`), any other `T` itself. Misuse is a compile error on the
/// option or argument at fault.
#[proc_macro_attribute]
pub fn cached(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::cached(attr.into(), item.into()).into()
}
