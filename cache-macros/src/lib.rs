//! The `#[cached]` attribute of `cache-runtime`. Depend on `cache-runtime`, which
//! re-exports it; this crate only rewrites code, the runtime does the work.

mod args;
mod expand;
mod format;
mod validate;

use proc_macro::TokenStream;

/// Turns an `async fn` into a cache-aside call; see `cache_runtime` for the options.
#[proc_macro_attribute]
pub fn cached(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::cached(attr.into(), item.into()).into()
}
