//! What `#[cached]` expansions call. Not a stable API: only the macro uses it.

pub use crate::detached::{Attached, Detach, Detached, Soft};
pub use crate::engine::{
    get_or_compute, invalidate, invalidate_all, refresh, ByClone, Cacheable, Call, NotShared, OkOnly, Plain,
    Probe, Sharing, SomeOnly, Tags,
};
pub use crate::schema::{push_part, Key, KeyArg, KeyBuilder};
pub use crate::spec::{duration, ttl, Spec, TtlSpec};
pub use crate::IntoTtl;
pub use serde;

use crate::Cache;

/// The process-wide cache the expansion uses when no `cache = ...` is given.
pub fn global() -> &'static Cache {
    crate::get_cache()
}

/// Names the return type in errors when it can't be cached; does nothing at run time.
pub fn assert_cacheable<M, T: Cacheable<M>>() {}

/// The condition when none is given.
pub fn always<V: ?Sized>(_: &V) -> bool {
    true
}
