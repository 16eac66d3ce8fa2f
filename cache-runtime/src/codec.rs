//! The stored representation: a fifteen-byte header, then the payload.
//!
//! The header is a magic byte, the wire version, the format, a 32-bit
//! checksum (xxh3) of what follows it, and the 64-bit fingerprint of the stored
//! type's shape (`shape.rs`). It names the format, so a reader never decodes
//! bytes with the wrong decoder whatever its own configured format is; the
//! checksum turns corrupted, truncated or foreign bytes into a miss even where
//! they would happen to decode; and the fingerprint turns an entry written for
//! another shape of the type (fields reordered, renamed or retyped by another
//! build) into a miss instead of into different values.
//!
//! An entry of a fail-safe or early-refreshed function is stamped: bytes in
//! front of the header, a marker, the moment (Unix milliseconds) it expires
//! logically, the moment it may no longer be served even as a last resort,
//! and how long the body that computed it took (the early refresh's measure
//! of how soon to start). A fail-safe entry lives until its last-resort
//! moment, as the value to serve when its function fails; [`decode`] reads
//! through the stamp.
//!
//! What is stored reads back equal: a value JSON can't represent (a NaN or an
//! infinity, which serde_json writes as `null`) is refused at encode.

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::CacheError;

mod finite;
mod shape;

const MAGIC: u8 = 0xCA;
/// The marker of a stamped entry without the body's time, as the first
/// fail-safe builds wrote them; never a header's first byte.
const STAMP: u8 = 0xCE;
const STAMP_LEN: usize = 17;
/// The marker of a stamped entry that carries the body's time.
const TIMED_STAMP: u8 = 0xCF;
const TIMED_STAMP_LEN: usize = 21;
/// Bumped when the header or an encoding changes incompatibly; also part of macro keys.
pub const WIRE_VERSION: u8 = 2;
/// [`WIRE_VERSION`] as a key names it, written out so building a key formats nothing.
pub(crate) const WIRE_KEY_TAG: &str = ":v2";
/// Where the checksum ends and what it covers (the fingerprint and the payload) begins.
const CHECKSUM_END: usize = 7;
const HEADER_LEN: usize = CHECKSUM_END + 8;

/// How values are encoded before they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Serialization {
    /// serde_json: readable, language-agnostic (the default).
    #[default]
    Json,
    /// MessagePack with named fields: compact, and readable by other languages.
    MsgPack,
    /// postcard: compact native binary for Rust-only consumers (the seeds' `pickle`).
    ///
    /// Not self-describing: types that need `deserialize_any` (untagged enums,
    /// `serde_json::Value`) read back as a miss; use JSON or MessagePack for those.
    Binary,
}

impl Serialization {
    /// The name used in configuration and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Serialization::Json => "json",
            Serialization::MsgPack => "msgpack",
            Serialization::Binary => "binary",
        }
    }

    fn tag(self) -> u8 {
        match self {
            Serialization::Json => 1,
            Serialization::MsgPack => 2,
            Serialization::Binary => 3,
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(Serialization::Json),
            2 => Some(Serialization::MsgPack),
            3 => Some(Serialization::Binary),
            _ => None,
        }
    }
}

impl fmt::Display for Serialization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Serialization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(Serialization::Json),
            "msgpack" | "messagepack" => Ok(Serialization::MsgPack),
            "binary" | "bincode" | "postcard" | "pickle" => Ok(Serialization::Binary),
            _ => {
                Err("expected one of json, msgpack, bincode (binary, postcard and pickle are aliases)".into())
            }
        }
    }
}

/// Read by name, with the aliases of [`FromStr`], so a settings section can say
/// `serialization: msgpack`.
impl<'de> serde::Deserialize<'de> for Serialization {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl serde::de::Visitor<'_> for NameVisitor {
            type Value = Serialization;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("one of json, msgpack, bincode (binary, postcard and pickle are aliases)")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Serialization, E> {
                name.parse().map_err(|_| E::invalid_value(serde::de::Unexpected::Str(name), &self))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

/// A value the cache can store: it serializes, and the shape of the type it is
/// read back as is known, to be written into the entry's header.
///
/// Implemented for every type that serializes and deserializes (borrowed ones
/// such as `&str` included, read back as their owned forms), and for `str` and
/// `[T]`, read back as `String` and `Vec<T>`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` can't be stored: it must implement both `Serialize` and `Deserialize`",
    label = "the stored value is read back as this type, so it must be `Deserialize` too"
)]
pub trait Storable: Serialize {
    /// The [`fingerprint`] of the type this value is read back as.
    fn fingerprint() -> u64;
}

impl<T: Serialize + Deserialize<'static>> Storable for T {
    fn fingerprint() -> u64 {
        shape::of::<T>()
    }
}

impl Storable for str {
    fn fingerprint() -> u64 {
        shape::of::<String>()
    }
}

impl<T: Serialize + Deserialize<'static>> Storable for [T] {
    fn fingerprint() -> u64 {
        shape::of::<Vec<T>>()
    }
}

/// Encodes `value` as `format`, header included, with the fingerprint of the
/// type it is read back as (see [`Storable`]).
///
/// # Errors
///
/// [`CacheError::Encode`] when the encoder fails, or when the value would not
/// read back equal: a NaN or an infinity in JSON.
pub fn encode<T: Storable + ?Sized>(format: Serialization, value: &T) -> Result<Vec<u8>, CacheError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&[MAGIC, WIRE_VERSION, format.tag(), 0, 0, 0, 0]);
    out.extend_from_slice(&T::fingerprint().to_le_bytes());
    let result = match format {
        Serialization::Json => serde_json::to_writer(&mut out, value)
            .map_err(|e| e.to_string())
            .and_then(|()| refuse_non_finite(&out[HEADER_LEN..], value)),
        Serialization::MsgPack => rmp_serde::encode::write_named(&mut out, value).map_err(|e| e.to_string()),
        Serialization::Binary => postcard::to_io(value, &mut out).map(drop).map_err(|e| e.to_string()),
    };
    result.map_err(|message| CacheError::Encode { format: format.as_str(), message })?;
    let sum = checksum(&out[CHECKSUM_END..]);
    out[3..CHECKSUM_END].copy_from_slice(&sum);
    Ok(out)
}

/// serde_json writes a NaN or an infinity as `null`: only JSON holding a
/// `null` can hide one, so the value is walked only then.
fn refuse_non_finite<T: Serialize + ?Sized>(json: &[u8], value: &T) -> Result<(), String> {
    if !json.windows(4).any(|w| w == b"null") {
        return Ok(());
    }
    finite::find(value).map_or(Ok(()), |found| Err(found.to_string()))
}

/// Decodes bytes written by [`encode`], in whatever format their header names.
///
/// # Errors
///
/// [`CacheError::TypeMismatch`] when the entry was written for another shape
/// of `T`; [`CacheError::Decode`] when the bytes are not a readable entry.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CacheError> {
    let bytes = unstamped(bytes);
    let (format, found, payload) = split_header(bytes)?;
    let expected = shape::of::<T>();
    if found != expected {
        return Err(CacheError::TypeMismatch { expected, found });
    }
    let result = match format {
        Serialization::Json => serde_json::from_slice(payload).map_err(|e| e.to_string()),
        Serialization::MsgPack => rmp_serde::from_slice(payload).map_err(|e| e.to_string()),
        Serialization::Binary => match postcard::take_from_bytes(payload) {
            Ok((value, [])) => Ok(value),
            Ok((_, rest)) => Err(format!("{} trailing bytes", rest.len())),
            Err(e) => Err(e.to_string()),
        },
    };
    result.map_err(|message| CacheError::Decode { format: format.as_str(), message })
}

/// The fingerprint of `T`'s shape that [`encode`] writes and [`decode`] expects.
///
/// Computed once per type and process. Equal for equal shapes in every build:
/// it changes when a struct or enum, or one of its fields or variants, is
/// renamed, reordered, added, removed or retyped. Types that can't be traced
/// (custom `Deserialize` impls that need a self-describing format or reject
/// placeholder values) are fingerprinted by their type name instead, so a
/// change inside them needs a `version` bump.
///
/// ```
/// #[derive(serde::Deserialize)]
/// struct Item { price_cents: u64, stock: u64 }
/// #[derive(serde::Deserialize)]
/// #[serde(rename = "Item")]
/// struct Reordered { stock: u64, price_cents: u64 }
///
/// use cache_runtime::codec::fingerprint;
/// assert_eq!(fingerprint::<Item>(), fingerprint::<Item>());
/// assert_ne!(fingerprint::<Item>(), fingerprint::<Reordered>());
/// assert_eq!(fingerprint::<String>(), fingerprint::<&str>());
/// ```
pub fn fingerprint<T: Deserialize<'static>>() -> u64 {
    shape::of::<T>()
}

/// What a stamp says of its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// When the entry expires logically (Unix milliseconds).
    pub(crate) expires_ms: u64,
    /// When it may no longer be served, even as a last resort.
    pub(crate) stale_until_ms: u64,
    /// How long the body that computed it took, in milliseconds (0: not recorded).
    pub(crate) took_ms: u32,
}

/// `encoded`, stamped. Without a body time, in the 17-byte layout every
/// fail-safe build reads; with one (early refresh), in the 21-byte layout.
pub(crate) fn stamp(stamp: Stamp, encoded: &[u8]) -> Vec<u8> {
    let timed = stamp.took_ms > 0;
    let mut out = Vec::with_capacity(TIMED_STAMP_LEN + encoded.len());
    out.push(if timed { TIMED_STAMP } else { STAMP });
    out.extend_from_slice(&stamp.expires_ms.to_le_bytes());
    out.extend_from_slice(&stamp.stale_until_ms.to_le_bytes());
    if timed {
        out.extend_from_slice(&stamp.took_ms.to_le_bytes());
    }
    out.extend_from_slice(encoded);
    out
}

/// A stamped entry's stamp, and how many bytes it takes; `None` for an unstamped entry.
fn stamp_of(bytes: &[u8]) -> Option<(Stamp, usize)> {
    let len = match bytes.first() {
        Some(&STAMP) => STAMP_LEN,
        Some(&TIMED_STAMP) => TIMED_STAMP_LEN,
        _ => return None,
    };
    if bytes.len() < len {
        return None;
    }
    let field = |at: usize| {
        let mut ms = [0; 8];
        ms.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(ms)
    };
    let took_ms = match len {
        TIMED_STAMP_LEN => u32::from_le_bytes([bytes[17], bytes[18], bytes[19], bytes[20]]),
        _ => 0,
    };
    Some((Stamp { expires_ms: field(1), stale_until_ms: field(9), took_ms }, len))
}

/// A stamped entry's stamp; `None` for an unstamped one.
#[inline]
pub(crate) fn stamped(bytes: &[u8]) -> Option<Stamp> {
    stamp_of(bytes).map(|(stamp, _)| stamp)
}

/// When a stamped entry expires logically (Unix milliseconds); `None` for an unstamped one.
#[inline]
pub(crate) fn logical_expiry(bytes: &[u8]) -> Option<u64> {
    stamped(bytes).map(|stamp| stamp.expires_ms)
}

/// The encoded entry behind a stamp, if any.
pub(crate) fn unstamped(bytes: &[u8]) -> &[u8] {
    match stamp_of(bytes) {
        Some((_, len)) => &bytes[len..],
        None => bytes,
    }
}

/// Now, in Unix milliseconds: the clock stamps are read against.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn split_header(bytes: &[u8]) -> Result<(Serialization, u64, &[u8]), CacheError> {
    let bad = |message: String| CacheError::Decode { format: "unknown", message };
    if bytes.len() < HEADER_LEN || bytes[0] != MAGIC {
        return Err(bad("no cache header (written by something else?)".into()));
    }
    if bytes[1] != WIRE_VERSION {
        return Err(bad(format!("wire version {} (this build reads {WIRE_VERSION})", bytes[1])));
    }
    let format = Serialization::from_tag(bytes[2]).ok_or_else(|| bad(format!("format tag {}", bytes[2])))?;
    if bytes[3..CHECKSUM_END] != checksum(&bytes[CHECKSUM_END..]) {
        return Err(bad("checksum mismatch (corrupted or truncated)".into()));
    }
    let mut fingerprint = [0; 8];
    fingerprint.copy_from_slice(&bytes[CHECKSUM_END..HEADER_LEN]);
    Ok((format, u64::from_le_bytes(fingerprint), &bytes[HEADER_LEN..]))
}

fn checksum(payload: &[u8]) -> [u8; 4] {
    (xxhash_rust::xxh3::xxh3_64(payload) as u32).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_tag_names_the_wire_version() {
        assert_eq!(WIRE_KEY_TAG, format!(":v{WIRE_VERSION}"));
    }
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Mission {
        id: u64,
        name: String,
        tags: Vec<String>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(rename = "Mission")]
    struct Reordered {
        tags: Vec<String>,
        name: String,
        id: u64,
    }

    fn sample() -> Mission {
        Mission { id: 7, name: "apollo".into(), tags: vec!["a".into()] }
    }

    #[test]
    fn every_format_round_trips() {
        for format in [Serialization::Json, Serialization::MsgPack, Serialization::Binary] {
            let bytes = encode(format, &sample()).unwrap();
            assert_eq!(bytes[2], format.tag());
            assert_eq!(decode::<Mission>(&bytes).unwrap(), sample(), "{format}");
        }
    }

    /// The stock entry of an older build, and of a newer one that reordered its fields.
    mod item {
        pub mod old {
            #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
            pub struct Item {
                pub price_cents: u64,
                pub stock: u64,
            }
        }
        pub mod new {
            #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
            pub struct Item {
                pub stock: u64,
                pub price_cents: u64,
            }
        }
        pub mod retyped {
            #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
            pub struct Item {
                pub price_cents: u64,
                pub stock: i64,
            }
        }
    }

    const FORMATS: [Serialization; 3] = [Serialization::Json, Serialization::MsgPack, Serialization::Binary];

    #[test]
    fn a_reordered_struct_reads_as_a_mismatch_in_every_format() {
        let old = item::old::Item { price_cents: 1999, stock: 10 };
        for format in FORMATS {
            let bytes = encode(format, &old).unwrap();
            match decode::<item::new::Item>(&bytes) {
                Err(CacheError::TypeMismatch { expected, found }) => {
                    assert_eq!(expected, fingerprint::<item::new::Item>());
                    assert_eq!(found, fingerprint::<item::old::Item>());
                }
                other => panic!("{format}: expected a type mismatch, got {other:?}"),
            }
            assert_eq!(decode::<item::old::Item>(&bytes).unwrap(), old, "{format}");
        }
    }

    #[test]
    fn without_the_fingerprint_postcard_swaps_reordered_fields() {
        let bytes = encode(Serialization::Binary, &item::old::Item { price_cents: 1999, stock: 10 }).unwrap();
        let swapped: item::new::Item = postcard::from_bytes(&bytes[HEADER_LEN..]).unwrap();
        assert_eq!((swapped.price_cents, swapped.stock), (10, 1999), "the payload alone decodes, wrongly");
    }

    #[test]
    fn a_retyped_field_reads_as_a_mismatch_in_every_format() {
        let old = item::old::Item { price_cents: 1999, stock: 10 };
        for format in FORMATS {
            let bytes = encode(format, &old).unwrap();
            let read = decode::<item::retyped::Item>(&bytes);
            assert!(matches!(read, Err(CacheError::TypeMismatch { .. })), "{format}: {read:?}");
        }
    }

    #[test]
    fn a_value_of_another_type_reads_as_a_mismatch() {
        let bytes = encode(Serialization::Json, &"hi").unwrap();
        assert!(matches!(decode::<Mission>(&bytes), Err(CacheError::TypeMismatch { .. })));
        assert_eq!(decode::<String>(&bytes).unwrap(), "hi", "a borrowed str is stored as a String");
        assert_eq!(decode::<String>(&encode(Serialization::Binary, "hi").unwrap()).unwrap(), "hi");
        let slice: &[u32] = &[1, 2];
        assert_eq!(decode::<Vec<u32>>(&encode(Serialization::MsgPack, slice).unwrap()).unwrap(), [1, 2]);
    }

    #[test]
    fn json_refuses_nan_and_infinity_at_encode() {
        assert_eq!(serde_json::to_string(&Some(f64::NAN)).unwrap(), "null", "what JSON alone would store");
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for result in [
                encode(Serialization::Json, &value),
                encode(Serialization::Json, &Some(value)),
                encode(Serialization::Json, &vec![1.0, value]),
                encode(Serialization::Json, &(value as f32)),
            ] {
                let err = result.unwrap_err();
                assert!(matches!(err, CacheError::Encode { format: "json", .. }), "{err:?}");
                assert!(err.to_string().contains("NaN or infinity can't be stored as JSON"), "{err}");
            }
        }
    }

    #[test]
    fn the_json_refusal_names_the_field() {
        #[derive(Serialize, Deserialize)]
        struct Reading {
            sensor: String,
            value: Option<f64>,
        }
        let reading = Reading { sensor: "null".into(), value: Some(f64::NAN) };
        let err = encode(Serialization::Json, &reading).unwrap_err();
        assert!(err.to_string().contains("in field `value`"), "{err}");
        let fine = Reading { sensor: "null".into(), value: None };
        let bytes = encode(Serialization::Json, &fine).unwrap();
        assert_eq!(decode::<Reading>(&bytes).unwrap().value, None, "a real null is stored");
    }

    #[test]
    fn nan_and_infinity_round_trip_in_msgpack_and_binary() {
        for format in [Serialization::MsgPack, Serialization::Binary] {
            let bytes = encode(format, &Some(f64::NAN)).unwrap();
            assert!(decode::<Option<f64>>(&bytes).unwrap().is_some_and(f64::is_nan), "{format}");
            let bytes = encode(format, &vec![f64::INFINITY, f64::NEG_INFINITY]).unwrap();
            assert_eq!(decode::<Vec<f64>>(&bytes).unwrap(), [f64::INFINITY, f64::NEG_INFINITY], "{format}");
        }
    }

    #[test]
    fn fingerprints_are_stable_and_follow_the_shape() {
        let first = fingerprint::<Mission>();
        assert_eq!(first, fingerprint::<Mission>());
        assert_eq!(first, shape::compute::<Mission>(), "the cached value is the traced one");
        assert_ne!(first, fingerprint::<Reordered>());
        assert_ne!(fingerprint::<u32>(), fingerprint::<u64>());
        assert_ne!(fingerprint::<Vec<u8>>(), fingerprint::<Option<u8>>());
        assert_eq!(fingerprint::<String>(), fingerprint::<&str>());
        assert_eq!(<str as Storable>::fingerprint(), fingerprint::<String>());
        assert_eq!(<[u8] as Storable>::fingerprint(), fingerprint::<Vec<u8>>());
    }

    #[test]
    fn stamps_of_both_layouts_read_back_and_decode_through() {
        let encoded = encode(Serialization::Json, &42u32).unwrap();
        let stamp = Stamp { expires_ms: 1_000, stale_until_ms: 5_000, took_ms: 37 };
        let timed = super::stamp(stamp, &encoded);
        assert_eq!(stamped(&timed), Some(stamp));
        assert_eq!(unstamped(&timed), &encoded[..]);
        assert_eq!(decode::<u32>(&timed).unwrap(), 42);
        // Without a body time: the 17-byte layout.
        let mut old = vec![STAMP];
        old.extend_from_slice(&1_000u64.to_le_bytes());
        old.extend_from_slice(&5_000u64.to_le_bytes());
        old.extend_from_slice(&encoded);
        assert_eq!(stamped(&old), Some(Stamp { took_ms: 0, ..stamp }));
        assert_eq!(super::stamp(Stamp { took_ms: 0, ..stamp }, &encoded), old);
        assert_eq!(decode::<u32>(&old).unwrap(), 42);
        assert_eq!(stamped(&encoded), None, "an unstamped entry");
        assert_eq!(stamped(&timed[..TIMED_STAMP_LEN - 1]), None, "a truncated stamp");
    }

    #[test]
    fn foreign_and_truncated_bytes_are_errors() {
        assert!(decode::<Mission>(b"{\"id\":7}").is_err());
        assert!(decode::<Mission>(&[MAGIC]).is_err());
        assert!(decode::<Mission>(&[MAGIC, WIRE_VERSION + 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'1'])
            .is_err());
        let mut retagged = encode(Serialization::Json, &sample()).unwrap();
        retagged[CHECKSUM_END] ^= 1;
        let read = decode::<Mission>(&retagged);
        assert!(
            matches!(read, Err(CacheError::Decode { .. })),
            "a flipped fingerprint bit is corruption: {read:?}"
        );
        let mut flipped = encode(Serialization::Json, &sample()).unwrap();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(decode::<Mission>(&flipped).is_err(), "a flipped bit must be caught");
        let bytes = encode(Serialization::Binary, &sample()).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode::<Mission>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn names_parse_with_aliases() {
        assert_eq!("pickle".parse::<Serialization>().unwrap(), Serialization::Binary);
        assert_eq!("MsgPack".parse::<Serialization>().unwrap(), Serialization::MsgPack);
        assert!("xml".parse::<Serialization>().is_err());
    }
}
