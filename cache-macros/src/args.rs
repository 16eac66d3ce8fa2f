//! The options of `#[cached(...)]`, each kept with its span.

use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{bracketed, parenthesized, Expr, Ident, Lit, LitBool, LitInt, LitStr, Path, Token};

const OPTIONS: &[&str] = &[
    "ttl",
    "prefix",
    "key_prefix",
    "tags",
    "condition",
    "key",
    "skip",
    "cache",
    "version",
    "crate",
    "profile",
    "cache_none",
    "near",
    "fail_safe",
    "early_refresh",
    "soft_timeout",
    "sensitive",
];

/// `ttl = 300`, `ttl = Duration::from_secs(5)` or `ttl = "quantum_state"`.
pub(crate) enum Ttl {
    Expr(Expr),
    Named(LitStr),
}

#[derive(Default)]
pub(crate) struct Args {
    pub(crate) ttl: Option<Ttl>,
    pub(crate) prefix: Option<LitStr>,
    pub(crate) tags: Option<Vec<LitStr>>,
    pub(crate) condition: Option<Expr>,
    pub(crate) key: Option<LitStr>,
    pub(crate) skip: Option<Vec<Ident>>,
    pub(crate) cache: Option<Expr>,
    pub(crate) version: Option<LitInt>,
    pub(crate) krate: Option<Path>,
    pub(crate) profile: Option<LitStr>,
    pub(crate) cache_none: Option<LitBool>,
    pub(crate) near: Option<LitBool>,
    pub(crate) fail_safe: Option<LitBool>,
    pub(crate) early_refresh: Option<LitBool>,
    pub(crate) soft_timeout: Option<Expr>,
    pub(crate) sensitive: Option<LitBool>,
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Args::default();
        let mut seen: Vec<String> = Vec::new();
        while !input.is_empty() {
            let name = Ident::parse_any(input)?;
            let key = name.to_string();
            let canonical = if key == "key_prefix" { "prefix".to_owned() } else { key.clone() };
            if !OPTIONS.contains(&key.as_str()) {
                return Err(unknown(&name));
            }
            if seen.contains(&canonical) {
                return Err(syn::Error::new(name.span(), format!("`{canonical}` set multiple times")));
            }
            seen.push(canonical);
            if key == "skip" && input.peek(syn::token::Paren) {
                let content;
                parenthesized!(content in input);
                args.skip = Some(idents(&content)?);
            } else {
                input.parse::<Token![=]>()?;
                args.set(&key, input)?;
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(args)
    }
}

impl Args {
    fn set(&mut self, key: &str, input: ParseStream<'_>) -> syn::Result<()> {
        match key {
            "ttl" => {
                self.ttl = Some(if input.peek(LitStr) {
                    Ttl::Named(input.parse()?)
                } else {
                    let expr: Expr = input.parse()?;
                    check_ttl(&expr)?;
                    Ttl::Expr(expr)
                })
            }
            "prefix" | "key_prefix" => self.prefix = Some(lit_str(input, key, "\"missions\"")?),
            "tags" => {
                let content =
                    brackets(input, "a list of string literals: `tags = [\"missions\", \"mission:{id}\"]`")?;
                let tags = Punctuated::<Lit, Token![,]>::parse_terminated(&content)?;
                self.tags = Some(
                    tags.into_iter()
                        .map(|lit| match lit {
                            Lit::Str(s) => Ok(s),
                            other => Err(syn::Error::new(
                                other.span(),
                                "tags are string literals: `tags = [\"missions\"]`",
                            )),
                        })
                        .collect::<syn::Result<_>>()?,
                )
            }
            "condition" => {
                self.condition = Some(not_lit(
                    input.parse()?,
                    "a function or closure: `condition = |v: &Mission| v.active`",
                )?)
            }
            "key" => self.key = Some(lit_str(input, key, "\"{mission_id}\"")?),
            "skip" => {
                let content = brackets(input, "a list of argument names: `skip = [db, conn]`")?;
                self.skip = Some(idents(&content)?);
            }
            "cache" => {
                self.cache =
                    Some(not_lit(input.parse()?, "an expression giving a `Cache`: `cache = self.cache`")?)
            }
            "version" => {
                let lit: Lit = input.parse()?;
                match lit {
                    Lit::Int(i) if i.base10_parse::<u32>().is_ok() => self.version = Some(i),
                    other => {
                        return Err(syn::Error::new(other.span(), "expected a whole number: `version = 2`"))
                    }
                }
            }
            "crate" => {
                self.krate = Some(if input.peek(LitStr) {
                    input.parse::<LitStr>()?.parse()?
                } else {
                    input.call(Path::parse_mod_style)?
                })
            }
            "profile" => self.profile = Some(lit_str(input, key, "\"api_response\"")?),
            "cache_none" => self.cache_none = Some(lit_bool(input)?),
            "near" => self.near = Some(lit_bool(input)?),
            "fail_safe" => self.fail_safe = Some(lit_bool(input)?),
            "early_refresh" => self.early_refresh = Some(lit_bool(input)?),
            "sensitive" => self.sensitive = Some(lit_bool(input)?),
            "soft_timeout" => self.soft_timeout = Some(duration(input.parse()?)?),
            _ => unreachable!("checked against OPTIONS"),
        }
        Ok(())
    }
}

fn lit_bool(input: ParseStream<'_>) -> syn::Result<LitBool> {
    match input.parse::<Lit>()? {
        Lit::Bool(b) => Ok(b),
        other => Err(syn::Error::new(other.span(), "expected `true` or `false`")),
    }
}

fn lit_str(input: ParseStream<'_>, key: &str, example: &str) -> syn::Result<LitStr> {
    let span = input.span();
    let expr: Expr = input.parse()?;
    match expr {
        Expr::Lit(syn::ExprLit { lit: Lit::Str(s), .. }) => Ok(s),
        _ => Err(syn::Error::new(span, format!("expected a string literal: `{key} = {example}`"))),
    }
}

fn brackets<'a>(input: ParseStream<'a>, expected: &str) -> syn::Result<syn::parse::ParseBuffer<'a>> {
    if !input.peek(syn::token::Bracket) {
        return Err(input.error(format!("expected {expected}")));
    }
    let content;
    bracketed!(content in input);
    Ok(content)
}

fn not_lit(expr: Expr, expected: &str) -> syn::Result<Expr> {
    match expr {
        Expr::Lit(_) => Err(syn::Error::new_spanned(expr, format!("expected {expected}"))),
        expr => Ok(expr),
    }
}

/// A positive duration: whole seconds or an expression giving a `Duration`.
fn duration(expr: Expr) -> syn::Result<Expr> {
    let wrong = match &expr {
        Expr::Lit(syn::ExprLit { lit: Lit::Int(i), .. }) => i.base10_parse::<u64>().map_or(true, |n| n == 0),
        Expr::Lit(_) | Expr::Array(_) | Expr::Tuple(_) | Expr::Closure(_) | Expr::Range(_) => true,
        _ => false,
    };
    if wrong {
        return Err(syn::Error::new_spanned(
            expr,
            "expected a positive duration: `soft_timeout = Duration::from_millis(200)`, or whole seconds",
        ));
    }
    Ok(expr)
}

fn idents(input: ParseStream<'_>) -> syn::Result<Vec<Ident>> {
    Ok(Punctuated::<Ident, Token![,]>::parse_terminated(input)?.into_iter().collect())
}

fn check_ttl(expr: &Expr) -> syn::Result<()> {
    if let Expr::Lit(syn::ExprLit { lit: Lit::Int(i), .. }) = expr {
        if i.base10_parse::<u64>().map_err(|e| syn::Error::new(i.span(), e))? == 0 {
            return Err(syn::Error::new(
                i.span(),
                "ttl must be positive (omit `ttl` for the configured default)",
            ));
        }
    }
    // Shapes that can't be seconds or a `Duration`: said here, not as a trait error.
    let wrong = match expr {
        Expr::Lit(syn::ExprLit { lit, .. }) => !matches!(lit, Lit::Int(_)),
        Expr::Array(_) | Expr::Tuple(_) | Expr::Closure(_) | Expr::Range(_) | Expr::Repeat(_) => true,
        _ => false,
    };
    if wrong {
        return Err(syn::Error::new_spanned(
            expr,
            "expected seconds, a `Duration` or a named TTL: `ttl = 300`, `ttl = Duration::from_secs(300)`, `ttl = \"quantum_state\"`",
        ));
    }
    Ok(())
}

fn unknown(name: &Ident) -> syn::Error {
    let given = name.to_string();
    let nearest = OPTIONS.iter().min_by_key(|o| distance(o, &given)).filter(|o| distance(o, &given) <= 3);
    let hint = nearest.map(|o| format!(" (did you mean `{o}`?)")).unwrap_or_default();
    syn::Error::new(
        name.span(),
        format!("unknown option `{given}`{hint}; expected one of: {}", OPTIONS.join(", ")),
    )
}

/// Levenshtein distance, for the "did you mean" hint.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_option() {
        let args: Args = syn::parse_str(
            r#"ttl = 60, key_prefix = "missions", tags = ["a", "b:{x}"], condition = |v: &u32| *v > 1,
               key = "{x}", skip(db), cache = self.cache, version = 2, crate = "renamed", profile = "p", cache_none = true, near = true"#,
        )
        .unwrap();
        assert!(matches!(args.ttl, Some(Ttl::Expr(_))));
        assert_eq!(args.prefix.unwrap().value(), "missions");
        assert_eq!(args.tags.unwrap().len(), 2);
        assert_eq!(args.skip.unwrap()[0], "db");
        assert!(args.cache_none.unwrap().value);
        assert!(args.near.unwrap().value);
    }

    #[test]
    fn suggests_the_nearest_option() {
        let err = syn::parse_str::<Args>("tll = 5").err().unwrap().to_string();
        assert!(err.contains("did you mean `ttl`"), "{err}");
        let err = syn::parse_str::<Args>("ttl = 5, ttl = 6").err().unwrap().to_string();
        assert!(err.contains("`ttl` set multiple times"), "{err}");
        let err = syn::parse_str::<Args>("prefix = \"a\", key_prefix = \"b\"").err().unwrap().to_string();
        assert!(err.contains("`prefix` set multiple times"), "{err}");
    }

    #[test]
    fn says_what_each_option_expects() {
        for (given, expected) in [
            ("ttl = [1]", "expected seconds"),
            ("ttl = 0", "ttl must be positive"),
            ("prefix = 5", "expected a string literal"),
            ("version = \"x\"", "expected a whole number"),
            ("tags = \"missions\"", "expected a list of string literals"),
            ("tags = [1]", "tags are string literals"),
            ("skip = db", "expected a list of argument names"),
            ("condition = \"yes\"", "expected a function or closure"),
            ("cache_none = 1", "expected `true` or `false`"),
            ("near = \"yes\"", "expected `true` or `false`"),
        ] {
            let err = syn::parse_str::<Args>(given).err().unwrap().to_string();
            assert!(err.contains(expected), "{given}: {err}");
        }
    }
}
