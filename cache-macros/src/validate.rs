//! Checks that involve the function and the options together; on success, the
//! shape of the function that expansion needs.

use syn::{FnArg, GenericParam, ItemFn, Pat, Receiver, ReceiverKind, ReturnType, Type};

use crate::args::Args;
use crate::format::{self, Segment};

/// How the return type is cached (the runtime's marker types).
pub(crate) enum Marker {
    Plain,
    OkOnly,
    SomeOnly,
}

pub(crate) struct Arg {
    pub(crate) ident: syn::Ident,
    pub(crate) ty: Box<Type>,
}

pub(crate) struct Shape {
    /// `&self` or `&mut self`, kept as written.
    pub(crate) receiver: Option<syn::Receiver>,
    pub(crate) args: Vec<Arg>,
    /// Indexes into `args` of the arguments the key is built from, in order.
    pub(crate) key_args: Vec<usize>,
    pub(crate) key_format: Option<Vec<Segment>>,
    pub(crate) tags: Vec<Vec<Segment>>,
    pub(crate) marker: Marker,
    pub(crate) output: Type,
    /// Whether the `cache` expression reads `self` (companions then take `&self`).
    pub(crate) cache_uses_self: bool,
    /// Whether the body may run in a task of its own (`early_refresh`, `soft_timeout`).
    pub(crate) detached: bool,
}

pub(crate) fn check(args: &Args, func: &ItemFn) -> syn::Result<Shape> {
    let sig = &func.sig;
    if sig.asyncness.is_none() {
        return Err(syn::Error::new(sig.fn_token.span, "#[cached] goes on an `async fn`"));
    }
    for param in &sig.generics.params {
        if !matches!(param, GenericParam::Lifetime(_)) {
            return Err(syn::Error::new_spanned(
                param,
                "generic parameters can't be part of a cache key: use concrete types (lifetimes are fine)",
            ));
        }
    }
    let mut receiver = None;
    let mut fn_args = Vec::new();
    for input in &sig.inputs {
        match input {
            // `&self`, `&mut self`, and their long forms `self: &Self`, `self: &'a mut Self`.
            FnArg::Receiver(r) if by_reference(r) => receiver = Some(r.clone()),
            FnArg::Receiver(r) => {
                return Err(syn::Error::new_spanned(
                    r,
                    "#[cached] methods take `&self` or `&mut self`: the receiver is not part of the key",
                ))
            }
            FnArg::Typed(t) => {
                match &*t.pat {
                    Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => {
                        fn_args.push(Arg { ident: p.ident.clone(), ty: t.ty.clone() })
                    }
                    other => return Err(syn::Error::new_spanned(
                        other,
                        "#[cached] needs plain argument names (bind the pattern inside the function body)",
                    )),
                }
            }
        }
    }
    let position = |ident: &syn::Ident, what: &str| {
        fn_args.iter().position(|a| a.ident == *ident).ok_or_else(|| {
            let names: Vec<String> = fn_args.iter().map(|a| format!("`{}`", a.ident)).collect();
            syn::Error::new(
                ident.span(),
                format!(
                    "{what} `{ident}` is not an argument of this function (arguments: {})",
                    names.join(", ")
                ),
            )
        })
    };

    let skipped: Vec<usize> =
        args.skip.iter().flatten().map(|i| position(i, "skipped")).collect::<syn::Result<_>>()?;
    let key_format = args.key.as_ref().map(format::parse).transpose()?;
    let key_args: Vec<usize> = match &key_format {
        Some(segments) => {
            let mut used = Vec::new();
            for ident in format::placeholders(segments) {
                let i = position(ident, "placeholder")?;
                if !used.contains(&i) {
                    used.push(i);
                }
            }
            used
        }
        None => (0..fn_args.len()).filter(|i| !skipped.contains(i)).collect(),
    };
    for &i in &key_args {
        let ty = &fn_args[i].ty;
        if impl_trait(quote::quote!(#ty)) {
            return Err(syn::Error::new_spanned(
                ty,
                "`impl Trait` arguments can't be part of a cache key: add the argument to `skip`",
            ));
        }
    }
    let mut tags = Vec::new();
    for lit in args.tags.iter().flatten() {
        let segments = format::parse(lit)?;
        for ident in format::placeholders(&segments) {
            position(ident, "placeholder")?;
        }
        tags.push(segments);
    }
    if let Some(prefix) = &args.prefix {
        let value = prefix.value();
        if value.is_empty() || value.contains(['*', '?', '[', ']', '\\']) {
            return Err(syn::Error::new(
                prefix.span(),
                "a prefix is non-empty and has no glob characters (`*`, `?`, `[`, `]`, `\\`): invalidate_all matches on it",
            ));
        }
    }

    let output = match &sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => (**ty).clone(),
    };
    let last = match &output {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last().map(|s| s.ident.to_string()),
        _ => None,
    };
    let cache_none = args.cache_none.as_ref().is_some_and(|b| b.value);
    let marker = match last.as_deref() {
        Some("Result") => Marker::OkOnly,
        Some("Option") if !cache_none => Marker::SomeOnly,
        _ => Marker::Plain,
    };
    let cache_uses_self = args.cache.as_ref().is_some_and(|e| mentions_self(quote::quote!(#e)));
    if cache_uses_self && receiver.is_none() {
        return Err(syn::Error::new_spanned(
            &args.cache,
            "`cache` reads `self`, but this function has no `&self`",
        ));
    }
    let detached = detachable(args, func, receiver.as_ref(), &fn_args)?;
    Ok(Shape {
        receiver,
        args: fn_args,
        key_args,
        key_format,
        tags,
        marker,
        output,
        cache_uses_self,
        detached,
    })
}

/// Whether the options run the body in a task of its own, and if so, that
/// it can: a task outlives the call, so the body may borrow nothing.
fn detachable(args: &Args, func: &ItemFn, receiver: Option<&Receiver>, fn_args: &[Arg]) -> syn::Result<bool> {
    let option = match (&args.early_refresh, &args.soft_timeout) {
        (Some(b), _) if b.value => "early_refresh",
        (_, Some(_)) => "soft_timeout",
        _ => return Ok(false),
    };
    if let (Some(timeout), Some(b)) = (&args.soft_timeout, &args.fail_safe) {
        if !b.value {
            return Err(syn::Error::new_spanned(
                timeout,
                "`soft_timeout` serves the last value while the body runs on: it needs `fail_safe` (drop `fail_safe = false`)",
            ));
        }
    }
    let borrowed = |what: String| {
        format!("`{option}` runs the body in a task of its own, which outlives the call: {what}; take owned values (an `Arc` for shared state)")
    };
    if let Some(r) = receiver {
        return Err(syn::Error::new_spanned(r, borrowed("a method borrows `self`".into())));
    }
    if let Some(lifetime) = func.sig.generics.lifetimes().next() {
        return Err(syn::Error::new_spanned(lifetime, borrowed("the arguments borrow".into())));
    }
    for arg in fn_args {
        let ty = &arg.ty;
        if borrows(quote::quote!(#ty)) {
            return Err(syn::Error::new_spanned(ty, borrowed(format!("`{}` is borrowed", arg.ident))));
        }
    }
    Ok(true)
}

/// Whether a type is or holds a reference (`&T`, `Cow<'a, str>`, `impl Trait` which may).
fn borrows(tokens: proc_macro2::TokenStream) -> bool {
    tokens.into_iter().any(|t| match t {
        proc_macro2::TokenTree::Punct(p) => p.as_char() == '&' || p.as_char() == '\'',
        proc_macro2::TokenTree::Ident(i) => i == "impl",
        proc_macro2::TokenTree::Group(g) => borrows(g.stream()),
        _ => false,
    })
}

/// Whether a type has an `impl Trait` anywhere, as in `&[impl Serialize]`.
fn impl_trait(tokens: proc_macro2::TokenStream) -> bool {
    tokens.into_iter().any(|t| match t {
        proc_macro2::TokenTree::Ident(i) => i == "impl",
        proc_macro2::TokenTree::Group(g) => impl_trait(g.stream()),
        _ => false,
    })
}

fn mentions_self(tokens: proc_macro2::TokenStream) -> bool {
    tokens.into_iter().any(|t| match t {
        proc_macro2::TokenTree::Ident(i) => i == "self",
        proc_macro2::TokenTree::Group(g) => mentions_self(g.stream()),
        _ => false,
    })
}

/// `&self`, `&mut self`, or a long form whose type is a reference (`self: &Self`).
fn by_reference(r: &Receiver) -> bool {
    match &r.kind {
        ReceiverKind::Reference(..) => true,
        ReceiverKind::Typed(_, ty) => matches!(**ty, Type::Reference(_)),
        _ => false,
    }
}
