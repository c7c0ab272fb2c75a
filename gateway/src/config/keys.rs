//! API keys: generation, hashing (SHA-256, hex) and digest parsing. Configs hold only digests.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Length of a SHA-256 digest in bytes.
pub type KeyDigest = [u8; 32];

/// Hashes a presented API key.
pub fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// Parses a hex SHA-256 digest from the config.
pub fn parse_digest(hex_digest: &str) -> Result<KeyDigest, String> {
    let bytes =
        hex::decode(hex_digest.trim()).map_err(|e| format!("{hex_digest:?} is not hex ({e})"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{hex_digest:?} is not 64 hex digits (a SHA-256 digest)"))
}

/// A fresh random key, `sk-tollgate-` followed by 32 bytes of OS randomness in hex.
pub fn generate() -> String {
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    format!("sk-tollgate-{}", hex::encode(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_key_digest_is_stable() {
        assert_eq!(
            hex::encode(digest("sk-tollgate-demo")),
            "179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f"
        );
        let k = generate();
        assert!(k.starts_with("sk-tollgate-") && k.len() == 12 + 64);
        assert_ne!(generate(), k);
        assert_eq!(parse_digest(&hex::encode(digest(&k))).unwrap(), digest(&k));
        assert!(parse_digest("abc").is_err());
        assert!(parse_digest("zz").is_err());
    }
}
