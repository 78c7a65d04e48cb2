//! VM names are DNS labels: they become hostnames and `NAME.vm`.

/// A name that is not a DNS label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid VM name `{0}`: use a DNS label (lowercase letters, digits and `-`, not starting \
     or ending with `-`, at most 63 characters)"
)]
pub struct InvalidName(pub String);

pub fn validate(name: &str) -> Result<(), InvalidName> {
    if banger_proto::is_dns_label(name) {
        Ok(())
    } else {
        Err(InvalidName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dns_labels_only() {
        for good in ["web", "a", "web-1", "0x", &"a".repeat(63)] {
            assert!(super::validate(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", &"a".repeat(64)] {
            assert!(super::validate(bad).is_err(), "{bad}");
        }
    }
}
