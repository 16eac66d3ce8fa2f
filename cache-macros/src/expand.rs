//! Code generation.
//!
//! Input:
//!
//! ```ignore
//! #[cached(ttl = 60, prefix = "missions", tags = ["mission:{id}"], skip = [db])]
//! pub async fn get_mission(id: u64, db: &Db) -> Result<Mission, DbError> { body }
//! ```
//!
//! Output (paths shortened; `rt` is `::cache_runtime::__private`):
//!
//! ```ignore
//! pub async fn get_mission(id: u64, db: &Db) -> Result<Mission, DbError> {
//!     let __cache = AsRef::<Cache>::as_ref(&(rt::global()));
//!     let __cache_spec = __cache_get_mission_spec();
//!     rt::get_or_compute::<rt::OkOnly, _, _, _, _>(
//!         rt::Call { cache: __cache, spec: &__cache_spec,
//!                    key: __cache_get_mission_key(__cache, &__cache_spec, &id) },
//!         rt::always,
//!         (&rt::Probe::<Result<Mission, DbError>>::new()).sharing(),
//!         (&rt::Probe::<<Result<Mission, DbError> as rt::Cacheable<rt::OkOnly>>::Value>::new()).sharing(),
//!         move || (rt::Tags::Owned(vec![/* "mission:{id}" */]), __cache_get_mission_body(id, db)),
//!     ).await
//! }
//! fn __cache_get_mission_spec() -> rt::Spec { .. }
//! fn __cache_get_mission_key(__cache: &Cache, __cache_spec: &rt::Spec, id: &u64) -> rt::Key { .. }
//! async fn __cache_get_mission_body(id: u64, db: &Db) -> Result<Mission, DbError> { body }
//! pub async fn get_mission_invalidate(id: u64) -> Result<bool, CacheError> { .. }
//! pub async fn get_mission_invalidate_all() -> Result<u64, CacheError> { .. }
//! pub fn get_mission_key(id: u64) -> String { .. }
//! pub async fn get_mission_refresh(id: u64, db: &Db) -> Result<Mission, DbError> { .. }
//! ```
//!
//! Methods get the same items as associated functions, called through `Self::`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Attribute, Ident, ItemFn};

use crate::args::{Args, Ttl};
use crate::format::Segment;
use crate::validate::{self, Marker, Shape};

pub(crate) fn cached(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(e) => return with_error(item, e),
    };
    let result = syn::parse2::<Args>(attr).and_then(|args| {
        let shape = validate::check(&args, &func)?;
        Ok(expand(&args, &func, &shape))
    });
    match result {
        Ok(tokens) => tokens,
        // The function as written, plus the error: IDEs keep working and users see one error.
        Err(e) => with_error(func.into_token_stream(), e),
    }
}

fn with_error(item: TokenStream, error: syn::Error) -> TokenStream {
    let error = error.to_compile_error();
    quote!(#item #error)
}

struct Names {
    spec: Ident,
    key: Ident,
    body: Ident,
    invalidate: Ident,
    invalidate_all: Ident,
    key_fn: Ident,
    refresh: Ident,
}

fn expand(args: &Args, func: &ItemFn, shape: &Shape) -> TokenStream {
    let rt = match &args.krate {
        Some(path) => quote!(#path),
        None => quote!(::cache_runtime),
    };
    let name = &func.sig.ident;
    let n = Names {
        spec: format_ident!("__cache_{}_spec", name),
        key: format_ident!("__cache_{}_key", name),
        body: format_ident!("__cache_{}_body", name),
        invalidate: format_ident!("{}_invalidate", name),
        invalidate_all: format_ident!("{}_invalidate_all", name),
        key_fn: format_ident!("{}_key", name),
        refresh: format_ident!("{}_refresh", name),
    };
    let vis = &func.vis;
    let cfgs: Vec<&Attribute> = func.attrs.iter().filter(|a| a.path().is_ident("cfg")).collect();
    // The user's lint levels apply to the body, where their code now is; an `expect`
    // goes there only, since on the rewritten function it would go unfulfilled.
    let is_lint =
        |a: &&Attribute| ["allow", "warn", "deny", "forbid", "expect"].iter().any(|l| a.path().is_ident(l));
    let body_attrs: Vec<&Attribute> =
        func.attrs.iter().filter(|a| a.path().is_ident("cfg") || is_lint(a)).collect();
    let attrs: Vec<&Attribute> = func.attrs.iter().filter(|a| !a.path().is_ident("expect")).collect();
    let generics = &func.sig.generics;
    let where_clause = &func.sig.generics.where_clause;
    let this = if shape.receiver.is_some() { quote!(Self::) } else { quote!() };
    let receiver_param = shape.receiver.as_ref().map(|r| quote!(#r,));
    let receiver_arg = shape.receiver.as_ref().map(|_| quote!(self,));
    let companion_self = shape.cache_uses_self.then(|| quote!(&self,));
    let output = &shape.output;

    let key_params: Vec<TokenStream> = shape.key_args.iter().map(|&i| param(shape, i)).collect();
    let key_ref_params: Vec<TokenStream> = shape
        .key_args
        .iter()
        .map(|&i| {
            let (ident, ty) = (&shape.args[i].ident, &shape.args[i].ty);
            quote!(#ident: &#ty)
        })
        .collect();
    let key_refs: Vec<TokenStream> = shape
        .key_args
        .iter()
        .map(|&i| {
            let ident = &shape.args[i].ident;
            quote!(&#ident)
        })
        .collect();
    let all_params: Vec<TokenStream> = (0..shape.args.len()).map(|i| param(shape, i)).collect();
    let all_idents: Vec<&Ident> = shape.args.iter().map(|a| &a.ident).collect();

    let spec_body = spec(args, name, &rt);
    let key_body = key(shape, &rt);
    let tags = tags(shape, &rt);
    // Paths in the runtime call are spanned on the return type, so that the trait
    // errors of a type that can't be cached point at it rather than at the attribute.
    let rt_out = respan(rt.clone(), output.span());
    let condition = match &args.condition {
        Some(cond) => quote_spanned!(cond.span()=> |__cache_v| (#cond)(__cache_v)),
        None => quote_spanned!(output.span()=> #rt_out::__private::always),
    };
    let marker = match shape.marker {
        Marker::Plain => quote_spanned!(output.span()=> #rt_out::__private::Plain),
        Marker::OkOnly => quote_spanned!(output.span()=> #rt_out::__private::OkOnly),
        Marker::SomeOnly => quote_spanned!(output.span()=> #rt_out::__private::SomeOnly),
    };
    let assert_output =
        quote_spanned!(output.span()=> #rt_out::__private::assert_cacheable::<#marker, #output>(););
    let cache = match &args.cache {
        Some(expr) => quote_spanned!(expr.span()=>
            let __cache_owner = &(#expr);
            let __cache: &#rt::Cache = ::core::convert::AsRef::<#rt::Cache>::as_ref(__cache_owner);
        ),
        None => quote!(let __cache: &#rt::Cache = #rt::__private::global();),
    };
    let key_hidden = &n.key;
    let body_name = &n.body;
    // The leader's result is shared with the callers that waited when it can't be
    // stored and its type is `Clone`, and a local-tier hit clones the value the
    // entry keeps when the stored type is `Clone` (both resolved by `Probe`, see
    // the runtime's engine). The stored type of `Result<T, E>` is often `Clone`
    // where the result is not.
    let probe = |ty: TokenStream| {
        quote_spanned! {output.span()=>
            {
                #[allow(unused_imports)]
                use #rt_out::__private::{ByClone as _, NotShared as _};
                (&#rt_out::__private::Probe::<#ty>::new()).sharing()
            },
        }
    };
    let sharing = probe(output.to_token_stream());
    let values = probe(quote_spanned! {output.span()=>
        <#output as #rt_out::__private::Cacheable<#marker>>::Value
    });
    let detach = if shape.detached {
        quote_spanned!(output.span()=> #rt_out::__private::Detached,)
    } else {
        quote_spanned!(output.span()=> #rt_out::__private::Attached,)
    };
    let sharing = quote!(#sharing #values #detach);
    let run = |function: &str, sharing: Option<&TokenStream>| {
        let function = Ident::new(function, output.span());
        let inferred = if sharing.is_some() { quote!(_, _, _, _) } else { quote!(_, _, _) };
        quote_spanned! {output.span()=>
            #rt_out::__private::#function::<#marker, #output, #inferred>(
                #rt::__private::Call {
                    cache: __cache,
                    spec: &__cache_spec,
                    key: #this #key_hidden(__cache, &__cache_spec, #(#key_refs),*),
                },
                #condition,
                #sharing
                // Called only when the body runs: a hit builds neither the tags nor the body.
                move || (#tags, #this #body_name(#receiver_arg #(#all_idents),*)),
            )
            .await
        }
    };
    let get_or_compute = run("get_or_compute", Some(&sharing));
    let refresh_call = run("refresh", None);

    // `mut` on an argument only matters to the body, which keeps it; here it would be unused.
    let mut sig = func.sig.clone();
    for input in &mut sig.inputs {
        if let syn::FnArg::Typed(syn::PatType { pat, .. }) = input {
            if let syn::Pat::Ident(p) = &mut **pat {
                p.mutability = None;
            }
        }
    }
    let mut body_sig = func.sig.clone();
    body_sig.ident = n.body.clone();
    let block = &func.block;
    let (spec_fn, key_fn, invalidate, invalidate_all, key_pub, refresh) =
        (&n.spec, &n.key, &n.invalidate, &n.invalidate_all, &n.key_fn, &n.refresh);
    let public_body = quote! {{
        #assert_output
        #cache
        let __cache_spec = #this #spec_fn();
        #get_or_compute
    }};
    let refresh_body = quote! {{
        #cache
        let __cache_spec = #this #spec_fn();
        #refresh_call
    }};
    let doc_invalidate = format!("Removes the cached result of `{name}` for these arguments.");
    let doc_invalidate_all = format!("Removes every cached result of `{name}`.");
    let doc_key = format!("The cache key (relative to the cache's prefix) of `{name}` for these arguments.");
    let doc_refresh = format!("Runs `{name}` and stores its result whatever is cached (write-through).");
    let allow = quote!(#[allow(
        clippy::too_many_arguments,
        clippy::needless_lifetimes,
        clippy::ptr_arg,
        clippy::redundant_closure,
        clippy::redundant_closure_call,
        unused_qualifications
    )]);

    quote! {
        #(#attrs)*
        #allow
        #vis #sig #public_body

        #(#cfgs)*
        #[doc(hidden)]
        #allow
        fn #spec_fn() -> #rt::__private::Spec {
            #spec_body
        }

        #(#cfgs)*
        #[doc(hidden)]
        #allow
        fn #key_fn #generics (__cache: &#rt::Cache, __cache_spec: &#rt::__private::Spec, #(#key_ref_params),*) -> #rt::__private::Key #where_clause {
            #key_body
        }

        #(#body_attrs)*
        #[doc(hidden)]
        #body_sig #block

        #(#cfgs)*
        #[doc = #doc_invalidate]
        #allow
        #vis async fn #invalidate #generics (#companion_self #(#key_params),*) -> ::core::result::Result<bool, #rt::CacheError> #where_clause {
            #cache
            #rt::__private::invalidate(__cache, &#this #key_fn(__cache, &#this #spec_fn(), #(#key_refs),*)).await
        }

        #(#cfgs)*
        #[doc = #doc_invalidate_all]
        #allow
        #vis async fn #invalidate_all(#companion_self) -> ::core::result::Result<u64, #rt::CacheError> {
            #cache
            #rt::__private::invalidate_all(__cache, &#this #spec_fn()).await
        }

        #(#cfgs)*
        #[doc = #doc_key]
        #allow
        #vis fn #key_pub #generics (#companion_self #(#key_params),*) -> ::std::string::String #where_clause {
            #cache
            #this #key_fn(__cache, &#this #spec_fn(), #(#key_refs),*).into_relative()
        }

        #(#cfgs)*
        #[doc = #doc_refresh]
        #allow
        #vis async fn #refresh #generics (#receiver_param #(#all_params),*) -> #output #where_clause #refresh_body
    }
}

fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut token| {
            if let proc_macro2::TokenTree::Group(g) = &mut token {
                *g = proc_macro2::Group::new(g.delimiter(), respan(g.stream(), span));
            }
            token.set_span(span);
            token
        })
        .collect()
}

fn param(shape: &Shape, i: usize) -> TokenStream {
    let (ident, ty) = (&shape.args[i].ident, &shape.args[i].ty);
    quote!(#ident: #ty)
}

fn spec(args: &Args, name: &Ident, rt: &TokenStream) -> TokenStream {
    let name = name.to_string();
    let name = name.strip_prefix("r#").unwrap_or(&name);
    let opt_str = |lit: &Option<syn::LitStr>| match lit {
        Some(l) => quote!(::core::option::Option::Some(#l)),
        None => quote!(::core::option::Option::None),
    };
    let prefix = opt_str(&args.prefix);
    let profile = opt_str(&args.profile);
    let ttl = match &args.ttl {
        Some(Ttl::Expr(e)) => {
            quote_spanned!(e.span()=> ::core::option::Option::Some(#rt::__private::ttl(#e)))
        }
        Some(Ttl::Named(l)) => {
            quote!(::core::option::Option::Some(#rt::__private::TtlSpec::Named(#l)))
        }
        None => quote!(::core::option::Option::None),
    };
    let version = match &args.version {
        Some(v) => quote!(#v),
        None => quote!(0),
    };
    let opt_bool = |lit: &Option<syn::LitBool>| match lit {
        Some(b) => quote!(::core::option::Option::Some(#b)),
        None => quote!(::core::option::Option::None),
    };
    let (near, fail_safe) = (opt_bool(&args.near), opt_bool(&args.fail_safe));
    let early_refresh = args.early_refresh.as_ref().is_some_and(|b| b.value);
    let sensitive = args.sensitive.as_ref().is_some_and(|b| b.value);
    let soft_timeout = match &args.soft_timeout {
        Some(e) => quote_spanned!(e.span()=> ::core::option::Option::Some(#rt::__private::duration(#e))),
        None => quote!(::core::option::Option::None),
    };
    quote! {
        #rt::__private::Spec {
            name: #name, prefix: #prefix, ttl: #ttl, profile: #profile, version: #version,
            near: #near, fail_safe: #fail_safe, early_refresh: #early_refresh, soft_timeout: #soft_timeout,
            sensitive: #sensitive,
        }
    }
}

fn key(shape: &Shape, rt: &TokenStream) -> TokenStream {
    let parts: Vec<TokenStream> = match &shape.key_format {
        Some(segments) => std::iter::once(quote!(__cache_key.custom();))
            .chain(segments.iter().map(|s| match s {
                Segment::Lit(l) => quote!(__cache_key.lit(#l);),
                Segment::Arg(ident) => {
                    let arg = shape.args.iter().find(|a| a.ident == *ident).expect("validated");
                    let (ident, ty) = (&arg.ident, &arg.ty);
                    quote_spanned!(ty.span()=> __cache_key.part(#ident);)
                }
            }))
            .collect(),
        None => shape
            .key_args
            .iter()
            .map(|&i| {
                let (ident, ty) = (&shape.args[i].ident, &shape.args[i].ty);
                quote_spanned!(ty.span()=> __cache_key.arg(#ident);)
            })
            .collect(),
    };
    quote! {
        let mut __cache_key = #rt::__private::KeyBuilder::new(__cache, __cache_spec);
        #(#parts)*
        __cache_key.finish()
    }
}

fn tags(shape: &Shape, rt: &TokenStream) -> TokenStream {
    let literal: Option<Vec<&String>> = shape
        .tags
        .iter()
        .map(|segments| match segments.as_slice() {
            [Segment::Lit(l)] => Some(l),
            _ => None,
        })
        .collect();
    if let Some(literal) = literal {
        return quote!(#rt::__private::Tags::Static(&[#(#literal),*]));
    }
    let tags = shape.tags.iter().map(|segments| {
        let pushes = segments.iter().map(|s| match s {
            Segment::Lit(l) => quote!(__cache_tag.push_str(#l);),
            Segment::Arg(ident) => {
                // Spanned on the argument's type, like the key's parts: a tag can name a skipped argument.
                let arg = shape.args.iter().find(|a| a.ident == *ident).expect("validated");
                let (ident, ty) = (&arg.ident, &arg.ty);
                let rt = respan(rt.clone(), ty.span());
                quote_spanned!(ty.span()=> #rt::__private::push_part(&mut __cache_tag, &#ident);)
            }
        });
        quote!({
            let mut __cache_tag = ::std::string::String::new();
            #(#pushes)*
            __cache_tag
        })
    });
    quote!(#rt::__private::Tags::Owned(::std::vec![#(#tags),*]))
}

#[cfg(test)]
mod tests {
    use quote::quote;

    #[test]
    fn a_typical_function_expands_to_one_runtime_call_and_its_companions() {
        let out = super::cached(
            quote!(ttl = 60, prefix = "missions", tags = ["missions", "mission:{mission_id}"], skip = [db]),
            quote!(
                /// Loads a mission.
                pub async fn get_mission(mission_id: String, db: &Db) -> Result<Mission, DbError> {
                    db.load(&mission_id).await
                }
            ),
        )
        .to_string();
        if std::env::var_os("CACHE_MACROS_PRINT").is_some() {
            println!("{out}");
        }
        for item in [
            "pub async fn get_mission (mission_id : String , db : & Db)",
            "get_or_compute :: < :: cache_runtime :: __private :: OkOnly",
            "async fn __cache_get_mission_body (mission_id : String , db : & Db)",
            "pub async fn get_mission_invalidate (mission_id : String)",
            "pub async fn get_mission_invalidate_all ()",
            "pub fn get_mission_key (mission_id : String)",
            "pub async fn get_mission_refresh (mission_id : String , db : & Db)",
            "Tags :: Owned",
        ] {
            assert!(out.contains(item), "missing `{item}` in\n{out}");
        }
        assert!(!out.contains("compile_error"), "{out}");
        assert_eq!(out.matches("db . load").count(), 1, "the body is emitted once");
    }
}
