//! VM names are DNS labels: they become hostnames and `NAME.vm`.

pub fn validate(name: &str) -> Result<(), String> {
    if banger_proto::is_dns_label(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid VM name `{name}`: use a DNS label (lowercase letters, digits and `-`, \
             not starting or ending with `-`, at most 63 characters)"
        ))
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
