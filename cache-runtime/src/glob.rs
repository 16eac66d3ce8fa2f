//! Redis glob semantics (`*`, `?`, `[abc]`, `[^a-z]`, `\` escapes) for the local tier,
//! so a pattern deletes the same keys whichever mode the cache runs in.

/// Whether `text` matches the Redis glob `pattern`.
pub fn matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: iterative backtracking, linear in practice.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class(pattern, p, text[t]) {
                        if matched {
                            p = next;
                            t += 1;
                            continue;
                        }
                    }
                }
                b'\\' if p + 1 < pattern.len() && pattern[p + 1] == text[t] => {
                    p += 2;
                    t += 1;
                    continue;
                }
                // An escape that does not match must not fall through to the literal arm.
                b'\\' if p + 1 < pattern.len() => {}
                c if c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Keys of every common shape and first character: a pattern matching all of
/// them selects everything, whatever its spelling (`[!-~]*`, `[^#]*` …).
#[cfg(feature = "http")]
const PROBES: &[&str] = &[
    "a",
    "Z",
    "0",
    "_",
    "-",
    "#",
    "~",
    ".",
    "%",
    "!",
    "@",
    "a:b",
    "missions:v1:m1",
    "Agents:1",
    "9:x",
    "_x:v1:_",
    "#h:x",
    "~x:1",
    ".x:1",
    "%25:x",
    "!x:y:z",
    "@x:1",
];

/// Whether a glob (relative to a cache's prefix) selects everything rather than
/// something: it names nothing (only `*`, `?`, negated classes and the `:`
/// separator: `*`, `?*`, `*:*`, `[^x]*`), or it matches keys of every shape.
#[cfg(feature = "http")]
pub fn matches_everything(pattern: &[u8]) -> bool {
    names_nothing(pattern) || PROBES.iter().all(|key| matches(pattern, key.as_bytes()))
}

#[cfg(feature = "http")]
fn names_nothing(pattern: &[u8]) -> bool {
    let (mut i, mut star) = (0, false);
    while i < pattern.len() {
        match pattern[i] {
            b'*' => {
                star = true;
                i += 1;
            }
            b'?' | b':' => i += 1,
            b'\\' if pattern.get(i + 1) == Some(&b':') => i += 2,
            b'[' if pattern.get(i + 1) == Some(&b'^') => match class(pattern, i, 0) {
                Some((_, next)) => i = next,
                None => return false,
            },
            _ => return false,
        }
    }
    star
}

/// The Redis glob `pattern` as an anchored Lua pattern, so a script can test keys
/// against it (`string.find(key, p)`) with at least the same coverage: where the
/// two languages part (an empty or unterminated class, a NUL byte, which Lua 5.1
/// patterns can't hold) or Lua's backtracking could blow up (more than four
/// `*`), it is `^.*$`, which covers every key. Covering more only refuses more
/// fills.
pub(crate) fn to_lua_pattern(pattern: &[u8]) -> Vec<u8> {
    const EVERY_KEY: &[u8] = b"^.*$";
    fn literal(out: &mut Vec<u8>, c: u8) {
        if !c.is_ascii_alphanumeric() {
            out.push(b'%');
        }
        out.push(c);
    }
    if pattern.contains(&0) {
        return EVERY_KEY.to_vec();
    }
    let mut out = vec![b'^'];
    let (mut i, mut stars) = (0, 0);
    while i < pattern.len() {
        match pattern[i] {
            // A run of stars is one star.
            b'*' if out.ends_with(b".*") => {}
            b'*' => {
                stars += 1;
                out.extend_from_slice(b".*");
            }
            b'?' => out.push(b'.'),
            b'\\' if i + 1 < pattern.len() => {
                i += 1;
                literal(&mut out, pattern[i]);
            }
            b'[' if pattern.get(i + 1..i + 3) == Some(b"^]") => {
                // `[^]` matches any one byte.
                out.push(b'.');
                i += 2;
            }
            // Redis reads `[a-]…` as a range up to `]`: no Lua spelling either.
            b'[' if class(pattern, i, 0).is_none_or(|(_, next)| pattern[next - 2] == b'-')
                || empty_class(pattern, i) =>
            {
                return EVERY_KEY.to_vec()
            }
            b'[' => {
                let mut j = i + 1;
                out.push(b'[');
                if pattern.get(j) == Some(&b'^') {
                    out.push(b'^');
                    j += 1;
                }
                while pattern[j] != b']' {
                    match pattern[j] {
                        b'\\' => {
                            literal(&mut out, pattern[j + 1]);
                            j += 2;
                        }
                        lo if pattern.get(j + 1) == Some(&b'-')
                            && pattern.get(j + 2).is_some_and(|&h| h != b']') =>
                        {
                            // Every member spelled out: Lua ranges can't have escaped ends.
                            let hi = pattern[j + 2];
                            let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                            (lo..=hi).for_each(|c| literal(&mut out, c));
                            j += 3;
                        }
                        c => {
                            literal(&mut out, c);
                            j += 1;
                        }
                    }
                }
                out.push(b']');
                i = j;
            }
            c => literal(&mut out, c),
        }
        i += 1;
    }
    if stars > 4 {
        return EVERY_KEY.to_vec();
    }
    out.push(b'$');
    out
}

fn empty_class(pattern: &[u8], start: usize) -> bool {
    let body = if pattern.get(start + 1) == Some(&b'^') { start + 2 } else { start + 1 };
    pattern.get(body) == Some(&b']')
}

/// Matches one byte against the class starting at `pattern[start] == b'['`;
/// returns whether it matched and where the pattern continues.
fn class(pattern: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    loop {
        match *pattern.get(i)? {
            b']' => break,
            b'\\' => {
                i += 1;
                matched |= *pattern.get(i)? == c;
                i += 1;
            }
            lo if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|&h| h != b']') => {
                let hi = pattern[i + 2];
                let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                matched |= (lo..=hi).contains(&c);
                i += 3;
            }
            x => {
                matched |= x == c;
                i += 1;
            }
        }
    }
    Some((matched != negate, i + 1))
}

#[cfg(test)]
mod tests {
    use super::matches;

    fn m(p: &str, t: &str) -> bool {
        matches(p.as_bytes(), t.as_bytes())
    }

    #[test]
    fn redis_glob_cases() {
        assert!(m("missions:*", "missions:1"));
        assert!(m("missions:*", "missions:"));
        assert!(!m("missions:*", "mission:1"));
        assert!(m("*", ""));
        assert!(m("h?llo", "hello"));
        assert!(!m("h?llo", "hllo"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(!m("a\\*", "a\\"));
        assert!(m("*:queue:*:x", "m:queue:high:x"));
        assert!(m("a*b*c", "aXXbYYbc"));
        assert!(!m("a*b*c", "aXXbYYb"));
        assert!(!m("[abc", "a"));
    }
}

#[cfg(test)]
mod lua {
    use super::to_lua_pattern;

    fn lua(p: &str) -> String {
        String::from_utf8(to_lua_pattern(p.as_bytes())).unwrap()
    }

    #[test]
    fn globs_become_anchored_lua_patterns() {
        assert_eq!(lua("missions:*"), "^missions%:.*$");
        assert_eq!(lua("a?b"), "^a.b$");
        assert_eq!(lua("a\\*b"), "^a%*b$");
        assert_eq!(lua("[ab]x"), "^[ab]x$");
        assert_eq!(lua("[^a]x"), "^[^a]x$");
        assert_eq!(lua("[a-c]"), "^[abc]$");
        assert_eq!(lua("[^]x"), "^.x$");
        assert_eq!(lua("a**b"), "^a.*b$");
        assert_eq!(lua("%.(+)$"), "^%%%.%(%+%)%$$");
    }

    #[test]
    fn what_lua_cannot_say_covers_every_key() {
        for p in ["[]x", "[abc", "a\0b", "*a*b*c*d*e", "[a-]x]"] {
            let p = p.replace("\\0", "\0");
            assert_eq!(to_lua_pattern(p.as_bytes()), b"^.*$", "{p:?}");
        }
    }
}

#[cfg(all(test, feature = "http"))]
mod everything {
    use super::matches_everything;

    #[test]
    fn patterns_that_select_everything() {
        for p in [
            "*",
            "**",
            "?*",
            "*?",
            "*:*",
            "*:*:*",
            "?*:*",
            "[^x]*",
            "*[^:]",
            "[^a-z]*:*",
            "\\:*:*",
            "[!-~]*",
            "[ -~]*",
            "[^#]*",
        ] {
            assert!(matches_everything(p.as_bytes()), "{p} should need invalidate_all");
        }
    }

    #[test]
    fn patterns_that_select_something() {
        for p in [
            "missions:*",
            "llm:*",
            "missions:queue:high:*",
            "*:v1:*",
            "user_*",
            "[ab]*",
            "[a-z]*",
            "\\**",
            "*a*",
            "?",
            "m?ssions:*",
            "agents:[0-9]*",
            "",
        ] {
            assert!(!matches_everything(p.as_bytes()), "{p} should pass without confirmation");
        }
    }
}
