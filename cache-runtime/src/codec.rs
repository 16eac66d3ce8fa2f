//! The stored representation: a seven-byte header, then the payload.
//!
//! The header is a magic byte, the wire version, the format, and a 32-bit
//! checksum of the payload (xxh3). It names the format, so a reader never
//! decodes bytes with the wrong decoder whatever its own configured format is,
//! and the checksum turns corrupted, truncated or foreign bytes into a miss
//! even where they would happen to decode.

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::CacheError;

const MAGIC: u8 = 0xCA;
/// Bumped when the header or an encoding changes incompatibly; also part of macro keys.
pub const WIRE_VERSION: u8 = 1;
const HEADER_LEN: usize = 7;

/// How values are encoded before they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Serialization {
    /// serde_json: readable, language-agnostic (the default).
    #[default]
    Json,
    /// MessagePack with named fields, so reordering a struct's fields breaks nothing.
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

/// Encodes `value` as `format`, header included.
pub fn encode<T: Serialize + ?Sized>(format: Serialization, value: &T) -> Result<Vec<u8>, CacheError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&[MAGIC, WIRE_VERSION, format.tag(), 0, 0, 0, 0]);
    let result = match format {
        Serialization::Json => serde_json::to_writer(&mut out, value).map_err(|e| e.to_string()),
        Serialization::MsgPack => rmp_serde::encode::write_named(&mut out, value).map_err(|e| e.to_string()),
        Serialization::Binary => postcard::to_io(value, &mut out).map(drop).map_err(|e| e.to_string()),
    };
    result.map_err(|message| CacheError::Encode { format: format.as_str(), message })?;
    let sum = checksum(&out[HEADER_LEN..]);
    out[3..HEADER_LEN].copy_from_slice(&sum);
    Ok(out)
}

/// Decodes bytes written by [`encode`], in whatever format their header names.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CacheError> {
    let (format, payload) = split_header(bytes)?;
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

fn split_header(bytes: &[u8]) -> Result<(Serialization, &[u8]), CacheError> {
    let bad = |message: String| CacheError::Decode { format: "unknown", message };
    if bytes.len() < HEADER_LEN || bytes[0] != MAGIC {
        return Err(bad("no cache header (written by something else?)".into()));
    }
    if bytes[1] != WIRE_VERSION {
        return Err(bad(format!("wire version {} (this build reads {WIRE_VERSION})", bytes[1])));
    }
    let format = Serialization::from_tag(bytes[2]).ok_or_else(|| bad(format!("format tag {}", bytes[2])))?;
    let payload = &bytes[HEADER_LEN..];
    if bytes[3..HEADER_LEN] != checksum(payload) {
        return Err(bad("checksum mismatch (corrupted or truncated)".into()));
    }
    Ok((format, payload))
}

fn checksum(payload: &[u8]) -> [u8; 4] {
    (xxhash_rust::xxh3::xxh3_64(payload) as u32).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Mission {
        id: u64,
        name: String,
        tags: Vec<String>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
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

    #[test]
    fn msgpack_survives_field_reordering() {
        let bytes = encode(Serialization::MsgPack, &sample()).unwrap();
        let r: Reordered = decode(&bytes).unwrap();
        assert_eq!((r.id, r.name.as_str()), (7, "apollo"));
    }

    #[test]
    fn foreign_and_truncated_bytes_are_errors() {
        assert!(decode::<Mission>(b"{\"id\":7}").is_err());
        assert!(decode::<Mission>(&[MAGIC]).is_err());
        assert!(decode::<Mission>(&[MAGIC, WIRE_VERSION + 1, 1, 0, 0, 0, 0, b'1']).is_err());
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
