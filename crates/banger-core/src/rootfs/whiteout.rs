//! OCI whiteout markers: `.wh.NAME` deletes NAME from the layers below, and
//! `.wh..wh..opq` hides everything the lower layers put in its directory.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

const PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

#[derive(Debug, PartialEq, Eq)]
pub enum Marker<'a> {
    /// Not a whiteout: an ordinary entry.
    None,
    /// Hide the named sibling from lower layers.
    Remove(&'a OsStr),
    /// Hide all lower-layer content of the containing directory.
    Opaque,
}

pub fn classify(name: &OsStr) -> Result<Marker<'_>, super::UnsafePath> {
    let bytes = name.as_bytes();
    if bytes == OPAQUE {
        return Ok(Marker::Opaque);
    }
    match bytes.strip_prefix(PREFIX) {
        None => Ok(Marker::None),
        Some(b"") | Some(b".") | Some(b"..") => {
            Err(format!("whiteout `{}` names no sibling", name.to_string_lossy()).into())
        }
        Some(rest) if rest.starts_with(b".wh.") => {
            Err(format!("unsupported whiteout `{}`", name.to_string_lossy()).into())
        }
        Some(rest) => Ok(Marker::Remove(OsStr::from_bytes(rest))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_markers() {
        assert_eq!(classify(OsStr::new("file")).unwrap(), Marker::None);
        assert_eq!(classify(OsStr::new(".whatever")).unwrap(), Marker::None);
        assert_eq!(
            classify(OsStr::new(".wh..wh..opq")).unwrap(),
            Marker::Opaque
        );
        assert_eq!(
            classify(OsStr::new(".wh.passwd")).unwrap(),
            Marker::Remove(OsStr::new("passwd"))
        );
        assert!(classify(OsStr::new(".wh...")).is_err());
        assert!(classify(OsStr::new(".wh.")).is_err());
        assert!(classify(OsStr::new(".wh..wh.plnk")).is_err());
    }
}
