//! Encrypted entries: the entries of sensitive prefixes (`sensitive_prefixes`,
//! `#[cached(sensitive = true)]`) are encrypted before they reach Redis, with
//! ChaCha20-Poly1305 under a key from `encryption_keys`.
//!
//! A sealed entry is its stamp, if it has one, in the clear (Lua reads the
//! expiry; its times are no secret, and they are authenticated), then a
//! marker, the name of the key that sealed it, a nonce and the ciphertext
//! with its tag. The name lets keys rotate: the first key seals, every key
//! opens. The Redis key name is authenticated too, so an entry copied under
//! another key does not open. The nonce is derived from the key name, the
//! stamp and the plaintext (keyed BLAKE3), as SIV does: no nonce repeats for
//! different plaintexts, and sealing the same entry again gives the same
//! bytes, which is what dropping an unreadable entry "if it is still the
//! same" compares. An entry of a sensitive prefix that is not sealed, or does
//! not open, reads as a miss, counted.
//!
//! Only Redis holds sealed bytes: the local and near tiers hold what this
//! process wrote or opened. Signing (`sign.rs`), when on too, covers the
//! sealed bytes.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

use crate::CacheError;

/// The marker of a sealed entry; never the first byte of a header, a stamp
/// or a big value's pointer.
const SEALED: u8 = 0xCD;
const NONCE_LEN: usize = 12;
/// The shortest secret taken: a short one is a guessable one.
const MIN_SECRET: usize = 16;

struct SealKey {
    name: String,
    cipher: ChaCha20Poly1305,
    nonce_key: [u8; 32],
}

/// Seals what the Redis tier writes under sensitive prefixes and opens what it reads.
pub(crate) struct Sealer {
    /// The first seals; all open.
    keys: Vec<SealKey>,
    /// `{key_prefix}:`, which every entry's name starts with.
    prefix: String,
    /// Whether a shard tag follows the prefix (a cluster).
    sharded: bool,
    /// Sensitive prefixes, from the settings and from `sensitive = true` functions seen since.
    sensitive: ArcSwap<Vec<String>>,
    any: AtomicBool,
    /// Reads refused: unsealed under a sensitive prefix, or not opening.
    refused: AtomicU64,
    /// Whether a sensitive function without keys was said.
    warned: AtomicBool,
    /// In local mode nothing reaches Redis: every function may be cached.
    local: bool,
}

impl Sealer {
    /// From `encryption_keys` (`name:secret,…`) and `sensitive_prefixes`;
    /// errors name the setting and never show a secret.
    pub(crate) fn new(
        keys: Option<&str>,
        sensitive: &[String],
        key_prefix: &str,
        sharded: bool,
    ) -> Result<Self, CacheError> {
        let refuse = |reason: &str| CacheError::config("encryption_keys", "***", reason);
        let mut ring: Vec<SealKey> = Vec::new();
        for entry in keys.into_iter().flat_map(|k| k.split(',')).map(str::trim).filter(|e| !e.is_empty()) {
            let Some((name, secret)) = entry.split_once(':') else {
                return Err(refuse(
                    "expected `name:secret` pairs separated by commas (a secret holds no comma)",
                ));
            };
            let name = name.trim();
            if name.is_empty()
                || name.len() > 64
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(refuse("a key name is 1 to 64 letters, digits, `-`, `_` or `.`"));
            }
            if secret.chars().count() < MIN_SECRET {
                return Err(refuse("each secret must be at least 16 characters"));
            }
            if ring.iter().any(|k| k.name == name) {
                return Err(refuse("a key name is given twice"));
            }
            let key = blake3::derive_key("cache-runtime entry encryption v1", secret.as_bytes());
            ring.push(SealKey {
                name: name.to_owned(),
                cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
                nonce_key: blake3::derive_key("cache-runtime entry nonce v1", secret.as_bytes()),
            });
        }
        for prefix in sensitive {
            if prefix.is_empty() || prefix.contains([':', '*', '?', '[', ']', '\\']) {
                return Err(CacheError::config(
                    "sensitive_prefixes",
                    prefix,
                    "a prefix is non-empty, without `:` or glob characters",
                ));
            }
        }
        if !sensitive.is_empty() && ring.is_empty() {
            return Err(CacheError::config(
                "sensitive_prefixes",
                sensitive.join(","),
                "needs `encryption_keys` (CACHE_ENCRYPTION_KEYS): sensitive entries are never written in the clear",
            ));
        }
        Ok(Sealer {
            keys: ring,
            prefix: format!("{key_prefix}:"),
            sharded,
            any: AtomicBool::new(!sensitive.is_empty()),
            sensitive: ArcSwap::from_pointee(sensitive.to_vec()),
            refused: AtomicU64::new(0),
            warned: AtomicBool::new(false),
            local: false,
        })
    }

    /// The sealer of a cache in local mode, which writes nothing to Redis.
    pub(crate) fn local() -> Self {
        let mut sealer = Sealer::new(None, &[], "", false).expect("nothing to check");
        sealer.local = true;
        sealer
    }

    /// Marks a `sensitive = true` function's prefix. `false` if nothing can
    /// seal it: its calls then bypass the cache, rather than write in the clear.
    pub(crate) fn register(&self, prefix: &str) -> bool {
        if self.local {
            return true;
        }
        if self.keys.is_empty() {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    prefix,
                    "a sensitive function, and no `encryption_keys`: its calls bypass the cache"
                );
            }
            return false;
        }
        if !self.sensitive.load().iter().any(|p| p == prefix) {
            self.sensitive.rcu(|known| {
                let mut known = Vec::clone(known);
                if !known.iter().any(|p| p == prefix) {
                    known.push(prefix.to_owned());
                }
                known
            });
            self.any.store(true, Ordering::Release);
        }
        true
    }

    /// Whether the entry named `full` is under a sensitive prefix.
    fn sensitive(&self, full: &str) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let Some(mut relative) = full.strip_prefix(&self.prefix) else { return false };
        if self.sharded {
            let Some(rest) = relative.get(crate::shard::TAG_LEN..) else { return false };
            relative = rest;
        }
        // The whole prefix, up to a segment boundary: a function's prefix may hold `:`.
        self.sensitive.load().iter().any(|p| {
            relative.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
        })
    }

    /// `bytes` as they are written under `full`: sealed, under a sensitive prefix.
    pub(crate) fn seal<'b>(&self, full: &str, bytes: &'b [u8]) -> Cow<'b, [u8]> {
        let Some(key) = self.keys.first().filter(|_| self.sensitive(full)) else {
            return Cow::Borrowed(bytes);
        };
        let stamp_len = bytes.len() - crate::codec::unstamped(bytes).len();
        let (stamp, plain) = bytes.split_at(stamp_len);
        let aad = associated(full, stamp);
        let mut hasher = blake3::Hasher::new_keyed(&key.nonce_key);
        hasher.update(&aad);
        hasher.update(plain);
        let digest = hasher.finalize();
        let nonce = Nonce::from_slice(&digest.as_bytes()[..NONCE_LEN]);
        let sealed = key
            .cipher
            .encrypt(nonce, Payload { msg: plain, aad: &aad })
            .expect("ChaCha20-Poly1305 seals any length a Redis string can hold");
        let mut out = Vec::with_capacity(stamp.len() + 2 + key.name.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(stamp);
        out.push(SEALED);
        out.push(key.name.len() as u8);
        out.extend_from_slice(key.name.as_bytes());
        out.extend_from_slice(nonce);
        out.extend_from_slice(&sealed);
        Cow::Owned(out)
    }

    /// What `bytes`, read under `full`, carry: opened if sealed; as they are
    /// if not sealed and not sensitive; `None` (a miss, counted) otherwise.
    pub(crate) fn open(&self, full: &str, bytes: Vec<u8>) -> Option<Vec<u8>> {
        let stamp_len = bytes.len() - crate::codec::unstamped(&bytes).len();
        if bytes.get(stamp_len) != Some(&SEALED) {
            if self.sensitive(full) {
                return self.refuse(full, "an entry of a sensitive prefix was not encrypted");
            }
            return Some(bytes);
        }
        let (stamp, rest) = bytes.split_at(stamp_len);
        let opened = (|| {
            let name_len = usize::from(*rest.get(1)?);
            let name = rest.get(2..2 + name_len)?;
            let key = self.keys.iter().find(|k| k.name.as_bytes() == name)?;
            let nonce = rest.get(2 + name_len..2 + name_len + NONCE_LEN)?;
            let sealed = rest.get(2 + name_len + NONCE_LEN..)?;
            let aad = associated(full, stamp);
            key.cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: &aad }).ok()
        })();
        match opened {
            Some(plain) => {
                let mut out = Vec::with_capacity(stamp.len() + plain.len());
                out.extend_from_slice(stamp);
                out.extend_from_slice(&plain);
                Some(out)
            }
            None => {
                self.refuse(full, "an encrypted entry did not open (an unknown key name, or changed bytes)")
            }
        }
    }

    fn refuse(&self, full: &str, what: &'static str) -> Option<Vec<u8>> {
        if self.refused.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(key = full, "{what}: read as a miss (counted in stats)");
        } else {
            tracing::debug!(key = full, "{what}: read as a miss");
        }
        None
    }

    /// Reads refused so far.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// What a seal authenticates besides the plaintext: the Redis key name
/// (length first, so name and stamp can't run into each other) and the stamp.
fn associated(full: &str, stamp: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(8 + full.len() + stamp.len());
    aad.extend_from_slice(&(full.len() as u64).to_le_bytes());
    aad.extend_from_slice(full.as_bytes());
    aad.extend_from_slice(stamp);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(keys: &str) -> Sealer {
        Sealer::new(Some(keys), &["users".to_owned()], "app", false).unwrap()
    }

    #[test]
    fn sensitive_entries_are_sealed_and_open_only_under_their_name_and_key() {
        let s = sealer("k1:0123456789abcdef0123");
        let plain = b"\xCAplaintext entry";
        let sealed = s.seal("app:users:v2:1", plain).into_owned();
        assert_ne!(&sealed[..], &plain[..]);
        assert!(!sealed.windows(9).any(|w| w == b"plaintext"), "no plaintext in Redis");
        assert_eq!(s.seal("app:users:v2:1", plain).into_owned(), sealed, "the same entry seals the same");
        assert_eq!(s.open("app:users:v2:1", sealed.clone()).as_deref(), Some(&plain[..]));
        assert_eq!(s.open("app:users:v2:2", sealed.clone()), None, "moved to another key");
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(s.open("app:users:v2:1", flipped), None, "changed");
        assert_eq!(s.open("app:users:v2:1", plain.to_vec()), None, "unsealed under a sensitive prefix");
        assert_eq!(s.refused(), 3);
        // Other prefixes pass as they are.
        assert!(matches!(s.seal("app:orders:1", plain), Cow::Borrowed(_)));
        assert_eq!(s.open("app:orders:1", plain.to_vec()).as_deref(), Some(&plain[..]));
    }

    #[test]
    fn a_registered_prefix_matches_whole_segments() {
        let s = Sealer::new(Some("k1:0123456789abcdef0123"), &[], "app", false).unwrap();
        assert!(matches!(s.seal("app:users:profile:v2:1", b"\xCAv"), Cow::Borrowed(_)), "not yet sensitive");
        assert!(s.register("users:profile"));
        assert!(matches!(s.seal("app:users:profile:v2:1", b"\xCAv"), Cow::Owned(_)));
        assert!(matches!(s.seal("app:users:profiles:1", b"\xCAv"), Cow::Borrowed(_)), "another prefix");
        assert!(matches!(s.seal("app:users:1", b"\xCAv"), Cow::Borrowed(_)));
        let keyless = Sealer::new(None, &[], "app", false).unwrap();
        assert!(!keyless.register("users"), "nothing to seal with: bypassed");
        assert!(Sealer::local().register("users"), "local mode writes nothing to Redis");
    }

    #[test]
    fn keys_rotate_by_name() {
        let old = sealer("k1:0123456789abcdef0123");
        let sealed = old.seal("app:users:1", b"\xCAvalue").into_owned();
        let rotated = sealer("k2:fedcba9876543210fedc,k1:0123456789abcdef0123");
        assert_eq!(rotated.open("app:users:1", sealed.clone()).as_deref(), Some(&b"\xCAvalue"[..]));
        let resealed = rotated.seal("app:users:1", b"\xCAvalue").into_owned();
        assert_eq!(old.open("app:users:1", resealed), None, "the old ring lacks k2");
        let without = sealer("k2:fedcba9876543210fedc");
        assert_eq!(without.open("app:users:1", sealed), None, "k1 dropped");
    }

    #[test]
    fn a_stamp_stays_in_the_clear_and_is_authenticated() {
        let s = sealer("k1:0123456789abcdef0123");
        let stamp = crate::codec::Stamp { expires_ms: 10, stale_until_ms: 20, took_ms: 3 };
        let entry = crate::codec::stamp(stamp, b"\xCAvalue");
        let sealed = s.seal("app:users:1", &entry).into_owned();
        assert_eq!(crate::codec::stamped(&sealed), Some(stamp));
        assert_eq!(s.open("app:users:1", sealed.clone()).as_deref(), Some(&entry[..]));
        let mut moved = sealed.clone();
        moved[1] ^= 1;
        assert_eq!(s.open("app:users:1", moved), None, "a changed stamp");
    }

    #[test]
    fn bad_settings_are_refused_without_showing_secrets() {
        for keys in [
            "k1:short",
            "nocolon0123456789abcdef",
            ":0123456789abcdef0123",
            "k1:0123456789abcdef0123,k1:0123456789abcdef0124",
        ] {
            let err = Sealer::new(Some(keys), &[], "app", false).err().expect(keys).to_string();
            assert!(!err.contains("0123456789") && !err.contains("short"), "{err}");
        }
        let err = Sealer::new(None, &["users".to_owned()], "app", false).err().unwrap().to_string();
        assert!(err.contains("encryption_keys"), "{err}");
        assert!(Sealer::new(Some("k:0123456789abcdef0123"), &["a:b".to_owned()], "app", false).is_err());
    }
}
