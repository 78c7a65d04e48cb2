//! Path names as banger carries them in JSON, its manifests and its
//! requests: UTF-8 as it is, a `\` written `\\`, and each byte that is not
//! UTF-8 as `\xHH`. Any Unix name round-trips, so a guest's or a host's
//! file whose name is not UTF-8 is synced like any other.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// `bytes` (a name, or a `/`-separated relative path) as carried.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// [`encode`] of a path.
pub fn encode_path(path: &Path) -> String {
    encode(path.as_os_str().as_bytes())
}

/// The bytes [`encode`] carried, as a path. Text it never made (a lone
/// `\`) stands for itself.
pub fn decode(text: &str) -> PathBuf {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
                continue;
            }
            if bytes.get(i + 1) == Some(&b'x') {
                let hex = bytes
                    .get(i + 2..i + 4)
                    .and_then(|h| std::str::from_utf8(h).ok());
                if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_name_round_trips() {
        for name in [
            &b"plain.txt"[..],
            b"caf\xc3\xa9",
            b"latin1-\xe9t\xe9",
            b"back\\slash",
            b"\\x41 is not A",
            b"\xff\xfe/\x80",
        ] {
            let carried = encode(name);
            assert!(std::str::from_utf8(carried.as_bytes()).is_ok());
            assert_eq!(decode(&carried).as_os_str().as_bytes(), name, "{carried}");
        }
        assert_eq!(encode(b"latin1-\xe9"), "latin1-\\xe9");
        assert_eq!(encode("café".as_bytes()), "café");
        assert_eq!(decode("lone\\").as_os_str().as_bytes(), b"lone\\");
    }
}
