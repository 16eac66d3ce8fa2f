//! Shards of one cache's keys on a Redis Cluster.
//!
//! A fill checks its entry's fence and writes its entry and tag indexes in one
//! script, and a cluster runs a script only on keys of one hash slot. So on a
//! cluster every entry belongs to one of `cluster_shards` shards, chosen by a
//! hash of its key, and each shard has its own fence hash, tag indexes and
//! big-value bodies, all named with the shard's hash tag: `{prefix}:{tag}…` for
//! entries, `{prefix}#{tag}…` for the rest. Whatever moves together with an
//! entry shares its slot; an invalidation of tags, of a pattern or of everything
//! runs once per shard.
//!
//! A shard's tag is four characters chosen so that the shards' slots are spread
//! evenly over the 16384 slots: masters own contiguous ranges of slots, so the
//! shards spread evenly over the masters too.

use std::sync::OnceLock;

/// Slots in a Redis Cluster.
pub(crate) const SLOTS: usize = 16384;

/// The width of a shard's hash tag, braces included: `{abcd}`.
pub(crate) const TAG_LEN: usize = 6;

/// The slot Redis Cluster assigns to `key`: CRC16 (XMODEM) of its hash tag, or
/// of the whole key without one.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS as u16
}

/// For every slot, the first four-character alphanumeric string that hashes
/// to it. Built once, on first use (about 200k CRCs).
fn slot_tags() -> &'static [[u8; 4]] {
    static TAGS: OnceLock<Box<[[u8; 4]]>> = OnceLock::new();
    TAGS.get_or_init(|| {
        const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut tags = vec![[0u8; 4]; SLOTS];
        let mut found = vec![false; SLOTS];
        let mut left = SLOTS;
        let n = ALPHABET.len();
        // 62^4 candidates: every slot is hit long before they run out.
        for i in 0..n * n * n * n {
            let tag =
                [ALPHABET[i / (n * n * n)], ALPHABET[i / (n * n) % n], ALPHABET[i / n % n], ALPHABET[i % n]];
            let s = usize::from(slot(&tag));
            if !found[s] {
                found[s] = true;
                tags[s] = tag;
                left -= 1;
                if left == 0 {
                    break;
                }
            }
        }
        tags.into_boxed_slice()
    })
}

/// The hash tag of shard `shard` of `shards`, braces included.
pub(crate) fn tag(shards: u16, shard: u16) -> [u8; TAG_LEN] {
    let slot = shard as usize * SLOTS / shards.max(1) as usize;
    let t = slot_tags()[slot];
    [b'{', t[0], t[1], t[2], t[3], b'}']
}

/// The shard of an entry whose key, relative to the prefix, is `relative`.
#[inline]
pub(crate) fn of(shards: u16, relative: &[u8]) -> u16 {
    if shards <= 1 {
        return 0;
    }
    (xxhash_rust::xxh3::xxh3_64(relative) % u64::from(shards)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"123456789"), 0x31C3 % SLOTS as u16);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn shards_spread_over_the_slots_in_order() {
        for shards in [2u16, 3, 16, 32, 1000, 16384] {
            let mut last = None;
            for s in 0..shards {
                let t = tag(shards, s);
                let got = slot(&t) as usize;
                assert_eq!(got, s as usize * SLOTS / shards as usize, "shard {s} of {shards}");
                assert!(last < Some(got));
                last = Some(got);
            }
        }
    }

    #[test]
    fn one_shard_is_shard_zero() {
        assert_eq!(of(1, b"anything"), 0);
        let spread: std::collections::HashSet<u16> =
            (0..1000).map(|i| of(16, format!("k{i}").as_bytes())).collect();
        assert_eq!(spread.len(), 16);
    }
}
