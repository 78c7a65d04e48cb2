//! Content digests. Only `sha256:<64 lowercase hex>` is accepted: digests name
//! cache files, so anything else is refused before it reaches a path.

pub fn validate(digest: &str) -> Result<&str, super::ContentError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("unsupported digest `{digest}` (only sha256 is supported)"))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!("malformed digest `{digest}`").into());
    }
    Ok(hex)
}

/// First 12 hex digits, as `image ls` shows them.
pub fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

pub fn sha256_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_sha256_passes() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(validate(&good).is_ok());
        for bad in [
            "sha512:aa".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:../../{}", "a".repeat(58)),
            "sha256:abc".to_string(),
        ] {
            assert!(validate(&bad).is_err(), "{bad}");
        }
        assert_eq!(short(&good), "aaaaaaaaaaaa");
    }
}
