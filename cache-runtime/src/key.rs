//! Key parts: readable for scalars, a fixed 128-bit hash for everything else.
//!
//! A scalar argument becomes readable text with every byte that means something
//! to Redis (`:` separators, glob characters, cluster hash-tag braces) or to this
//! encoding (`%`, `#`, `~`) percent-escaped, so no argument can widen a pattern,
//! fake a separator or collide with another argument. Composite values, byte
//! strings and long strings become `#` and the hex xxh3-128 of their postcard
//! encoding: both are fixed, documented algorithms, so every process, build and
//! Rust version computes the same key and replicas share entries.

use std::fmt::Write as _;

use serde::ser::{self, Impossible, Serialize};

/// Strings longer than this (after escaping) are hashed, bounding key length.
const MAX_READABLE: usize = 64;

/// Appends the key-part form of `value` to `out`.
pub fn push_part<T: Serialize + ?Sized>(out: &mut String, value: &T) {
    let start = out.len();
    match value.serialize(PartSerializer { out: &mut *out }) {
        Ok(()) => {}
        Err(Composite) => {
            out.truncate(start);
            push_hash(out, value);
        }
    }
}

fn push_hash<T: Serialize + ?Sized>(out: &mut String, value: &T) {
    match postcard::to_allocvec(value) {
        Ok(bytes) => {
            let _ = write!(out, "#{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes));
        }
        // A shared fallback digest would let two different values share an entry;
        // the marker instead makes the whole call bypass the cache.
        Err(_) => out.push_str(UNCACHEABLE),
    }
}

/// Hashes keys for the in-process maps (the local tier, the flights): one
/// xxh3 per `write`. The streaming `Xxh3` hasher of xxhash-rust goes through a
/// buffer, which costs several times the one-shot hash of a short key, and a
/// local hit hashes its key once or twice. Seeded per process, so which slot
/// a key lands in can't be chosen from outside.
#[derive(Clone)]
pub(crate) struct KeyHashing {
    seed: u64,
}

impl Default for KeyHashing {
    fn default() -> Self {
        use std::hash::BuildHasher;
        KeyHashing { seed: std::collections::hash_map::RandomState::new().hash_one(0u64) }
    }
}

impl std::hash::BuildHasher for KeyHashing {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.seed)
    }
}

/// The hasher of [`KeyHashing`].
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Marks a key that could not be built; calls carrying it bypass the cache.
pub(crate) const UNCACHEABLE: &str = "#!uncacheable";

fn push_escaped(out: &mut String, s: &str) {
    if s.is_empty() {
        // A lone `%` can't come from escaping, which always writes `%XX`.
        out.push('%');
        return;
    }
    let start = out.len();
    for ch in s.chars() {
        match ch {
            '%' | ':' | '*' | '?' | '[' | ']' | '\\' | '#' | '~' | '{' | '}' | '^' | ' ' | '\u{7f}' => {
                let _ = write!(out, "%{:02X}", ch as u32);
            }
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            c => out.push(c),
        }
        if out.len() - start > MAX_READABLE {
            out.truncate(start);
            push_hash(out, s);
            return;
        }
    }
}

/// Escapes `*`, `?`, `[`, `]` and `\` so `s` matches only itself in a Redis glob.
pub fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// The signal that a value is not a scalar and must be hashed.
#[derive(Debug)]
struct Composite;

impl std::fmt::Display for Composite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("composite value")
    }
}

impl std::error::Error for Composite {}

impl ser::Error for Composite {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Composite
    }
}

struct PartSerializer<'a> {
    out: &'a mut String,
}

macro_rules! display_scalars {
    ($($method:ident: $ty:ty),*) => {
        $(fn $method(self, v: $ty) -> Result<(), Composite> {
            let _ = write!(self.out, "{v}");
            Ok(())
        })*
    };
}

macro_rules! decimal_scalars {
    ($($method:ident: $ty:ty),*) => {
        $(fn $method(self, v: $ty) -> Result<(), Composite> {
            if v < 0 {
                self.out.push('-');
            }
            push_decimal(self.out, v.unsigned_abs().into());
            Ok(())
        })*
    };
}

/// Appends `v` in decimal, as `Display` writes it: on a local hit the
/// formatting machinery would cost more than the rest of the key.
fn push_decimal(out: &mut String, v: u64) {
    out.push_str(itoa::Buffer::new().format(v));
}

impl<'a> ser::Serializer for PartSerializer<'a> {
    type Ok = ();
    type Error = Composite;
    type SerializeSeq = Impossible<(), Composite>;
    type SerializeTuple = Impossible<(), Composite>;
    type SerializeTupleStruct = Impossible<(), Composite>;
    type SerializeTupleVariant = Impossible<(), Composite>;
    type SerializeMap = Impossible<(), Composite>;
    type SerializeStruct = Impossible<(), Composite>;
    type SerializeStructVariant = Impossible<(), Composite>;

    display_scalars!(serialize_bool: bool, serialize_i128: i128, serialize_u128: u128);
    decimal_scalars!(serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64);

    fn serialize_u8(self, v: u8) -> Result<(), Composite> {
        self.serialize_u64(v.into())
    }

    fn serialize_u16(self, v: u16) -> Result<(), Composite> {
        self.serialize_u64(v.into())
    }

    fn serialize_u32(self, v: u32) -> Result<(), Composite> {
        self.serialize_u64(v.into())
    }

    fn serialize_u64(self, v: u64) -> Result<(), Composite> {
        push_decimal(self.out, v);
        Ok(())
    }

    fn serialize_f32(self, v: f32) -> Result<(), Composite> {
        self.serialize_f64(f64::from(v))
    }

    fn serialize_f64(self, v: f64) -> Result<(), Composite> {
        // `Display` prints `1` for 1.0; the `f` keeps floats apart from integers.
        let _ = write!(self.out, "{v}f");
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result<(), Composite> {
        push_escaped(self.out, v.encode_utf8(&mut [0; 4]));
        Ok(())
    }

    fn serialize_str(self, v: &str) -> Result<(), Composite> {
        push_escaped(self.out, v);
        Ok(())
    }

    fn serialize_bytes(self, _: &[u8]) -> Result<(), Composite> {
        Err(Composite)
    }

    fn serialize_none(self) -> Result<(), Composite> {
        self.out.push('~');
        Ok(())
    }

    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), Composite> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), Composite> {
        self.out.push('~');
        Ok(())
    }

    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Composite> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Result<(), Composite> {
        push_escaped(self.out, variant);
        Ok(())
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Composite> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), Composite> {
        Err(Composite)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Composite> {
        Err(Composite)
    }

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Composite> {
        Err(Composite)
    }

    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, Composite> {
        Err(Composite)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Composite> {
        Err(Composite)
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Composite> {
        Err(Composite)
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Composite> {
        Err(Composite)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Composite> {
        Err(Composite)
    }
}

/// A key name for listing, lossless whatever another client wrote: each
/// backslash as `\\\\` and each byte that is not UTF-8 as `\\xNN`.
pub(crate) fn display_key(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_key_is_lossless() {
        assert_eq!(display_key(b"missions:v1:m1"), "missions:v1:m1");
        assert_eq!(display_key(b"missions:v1:a\\b"), "missions:v1:a\\\\b");
        assert_eq!(display_key(b"bad:\xff\xfe:a\\b"), "bad:\\xff\\xfe:a\\\\b");
        assert_ne!(display_key(b"\xff"), display_key(b"\\xff"));
    }

    fn part<T: Serialize + ?Sized>(v: &T) -> String {
        let mut s = String::new();
        push_part(&mut s, v);
        s
    }

    #[derive(serde::Serialize)]
    struct Filter {
        region: &'static str,
        limit: u32,
    }

    #[test]
    fn scalars_stay_readable() {
        assert_eq!(part(&42u64), "42");
        assert_eq!(part(&-3i32), "-3");
        assert_eq!(part("mission_123"), "mission_123");
        assert_eq!(part(&String::from("ünïcode")), "ünïcode");
        assert_eq!(part(&true), "true");
        assert_eq!(part(&1.5f64), "1.5f");
        assert_eq!(part(&Some(5u8)), "5");
        assert_eq!(part(&None::<u8>), "~");
    }

    #[test]
    fn integers_read_as_display_writes_them() {
        for v in [0, 1, 9, 10, 99, 100, 4_294_967_295, u64::MAX] {
            assert_eq!(part(&v), v.to_string());
        }
        for v in [0, -1, -9, -10, 7, i64::MIN, i64::MAX] {
            assert_eq!(part(&v), v.to_string());
        }
        assert_eq!(
            (part(&i8::MIN), part(&u8::MAX), part(&i16::MIN)),
            ("-128".into(), "255".into(), "-32768".into())
        );
    }

    #[test]
    fn separators_and_globs_are_escaped() {
        assert_eq!(part("a:b"), "a%3Ab");
        assert_eq!(part("*"), "%2A");
        assert_eq!(part("x?[y]\\"), "x%3F%5By%5D%5C");
        assert_eq!(part("{tag}"), "%7Btag%7D");
        assert_eq!(part("nul\0"), "nul%00");
        assert_ne!(part(""), part("~"));
        assert_ne!(part("%3A"), part(":"));
    }

    #[test]
    fn composites_and_long_strings_hash_to_a_fixed_digest() {
        let f = part(&Filter { region: "eu", limit: 10 });
        assert!(f.starts_with('#') && f.len() == 33, "{f}");
        assert_eq!(f, part(&Filter { region: "eu", limit: 10 }));
        assert_ne!(f, part(&Filter { region: "eu", limit: 11 }));
        // Pinned: the digest must not change between builds or Rust versions.
        assert_eq!(part(&vec![1u8, 2, 3]), "#b0ad5980e3609cf4cfc56183b8f4d165");
        let long = "x".repeat(1 << 20);
        let p = part(long.as_str());
        assert!(p.starts_with('#') && p.len() == 33);
        assert_ne!(p, part("x".repeat((1 << 20) + 1).as_str()));
        assert_ne!(part(&(1u8, 2u8)), part(&(2u8, 1u8)));
    }

    #[test]
    fn glob_escaping() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
