//! `"queue:{priority}:{id}"`: literal text and `{argument}` placeholders.

use syn::{Ident, LitStr};

/// One piece of a key or tag format.
pub(crate) enum Segment {
    Lit(String),
    Arg(Ident),
}

/// Splits `lit` into segments; `{{` and `}}` stand for literal braces.
pub(crate) fn parse(lit: &LitStr) -> syn::Result<Vec<Segment>> {
    let text = lit.value();
    let mut segments = Vec::new();
    let mut literal = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let name = name.trim();
                let ident = syn::parse_str::<Ident>(name).map_err(|_| {
                    syn::Error::new(
                        lit.span(),
                        format!("`{{{name}}}` is not an argument name: placeholders are `{{argument}}`"),
                    )
                })?;
                if !literal.is_empty() {
                    segments.push(Segment::Lit(std::mem::take(&mut literal)));
                }
                segments.push(Segment::Arg(Ident::new(&ident.to_string(), lit.span())));
            }
            '}' => return Err(syn::Error::new(lit.span(), "unmatched `}` (write `}}` for a literal brace)")),
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        segments.push(Segment::Lit(literal));
    }
    Ok(segments)
}

/// Placeholders named in `segments`.
pub(crate) fn placeholders(segments: &[Segment]) -> impl Iterator<Item = &Ident> {
    segments.iter().filter_map(|s| match s {
        Segment::Arg(ident) => Some(ident),
        Segment::Lit(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proc_macro2::Span;

    fn parts(s: &str) -> Vec<String> {
        parse(&LitStr::new(s, Span::call_site()))
            .unwrap()
            .into_iter()
            .map(|s| match s {
                Segment::Lit(l) => format!("lit:{l}"),
                Segment::Arg(a) => format!("arg:{a}"),
            })
            .collect()
    }

    #[test]
    fn splits_literals_and_placeholders() {
        assert_eq!(parts("mission:{mission_id}"), ["lit:mission:", "arg:mission_id"]);
        assert_eq!(parts("{a}:{b}"), ["arg:a", "lit::", "arg:b"]);
        assert_eq!(parts("{{x}}"), ["lit:{x}"]);
        assert_eq!(parts("plain"), ["lit:plain"]);
    }

    #[test]
    fn rejects_bad_placeholders() {
        assert!(parse(&LitStr::new("{1x}", Span::call_site())).is_err());
        assert!(parse(&LitStr::new("a}", Span::call_site())).is_err());
    }
}
