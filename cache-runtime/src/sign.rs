//! Signed entries: with `signing_key` set, every entry and big-value body the
//! Redis tier writes ends in a 16-byte MAC, keyed BLAKE3 over its Redis key
//! and its bytes. A read whose MAC is missing or wrong is a miss, counted:
//! whoever can write to Redis without the secret can make the cache miss,
//! never make it decode what they wrote. The key is in the MAC, so an entry
//! copied under another key fails too.
//!
//! The local and near tiers hold what this process verified or wrote: they
//! are not signed.

/// The MAC's length: 128 bits, ample for an online forgery.
pub(crate) const TAG_LEN: usize = 16;

pub(crate) struct Signer {
    key: [u8; 32],
}

impl Signer {
    /// A MAC key derived from `secret`, whatever its length.
    pub(crate) fn new(secret: &str) -> Self {
        Signer { key: blake3::derive_key("cache-runtime entry MAC v1", secret.as_bytes()) }
    }

    fn tag(&self, name: &str, bytes: &[u8]) -> [u8; TAG_LEN] {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        // The name's length first: (name, bytes) pairs can't run into each other.
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(bytes);
        let mut tag = [0; TAG_LEN];
        tag.copy_from_slice(&hasher.finalize().as_bytes()[..TAG_LEN]);
        tag
    }

    /// `bytes` with their MAC under `name`.
    pub(crate) fn sign(&self, name: &str, bytes: &[u8]) -> Vec<u8> {
        let mut signed = Vec::with_capacity(bytes.len() + TAG_LEN);
        signed.extend_from_slice(bytes);
        signed.extend_from_slice(&self.tag(name, bytes));
        signed
    }

    /// The bytes `signed` carries under `name`, if its MAC is right.
    pub(crate) fn verify(&self, name: &str, mut signed: Vec<u8>) -> Option<Vec<u8>> {
        let len = signed.len().checked_sub(TAG_LEN)?;
        let expected = self.tag(name, &signed[..len]);
        // Constant time: `blake3::Hash`'s equality is.
        let found: [u8; 32] = {
            let mut padded = [0; 32];
            padded[..TAG_LEN].copy_from_slice(&signed[len..]);
            padded
        };
        let mut wanted = [0; 32];
        wanted[..TAG_LEN].copy_from_slice(&expected);
        if blake3::Hash::from(found) != blake3::Hash::from(wanted) {
            return None;
        }
        signed.truncate(len);
        Some(signed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_value_verifies_only_under_its_key_and_secret() {
        let signer = Signer::new("s3cret");
        let signed = signer.sign("app:k", b"value");
        assert_eq!(signer.verify("app:k", signed.clone()).as_deref(), Some(&b"value"[..]));
        assert_eq!(signer.verify("app:other", signed.clone()), None, "moved to another key");
        assert_eq!(Signer::new("other").verify("app:k", signed.clone()), None, "another secret");
        let mut flipped = signed.clone();
        flipped[0] ^= 1;
        assert_eq!(signer.verify("app:k", flipped), None, "a changed value");
        assert_eq!(signer.verify("app:k", b"short".to_vec()), None, "no room for a MAC");
        assert_eq!(signer.verify("app:k", b"value".to_vec()), None, "never signed");
    }
}
