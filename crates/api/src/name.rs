//! Names of services (DNS labels, so `<service>.<domain>` is a valid host).

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name {0:?}: must be 1 to 63 characters")]
    Length(String),
    #[error(
        "name {0:?}: only lowercase letters, digits and '-' are allowed, starting with a letter and not ending with '-'"
    )]
    Charset(String),
}

/// Validates a service name as an RFC 1123 DNS label that starts with a letter.
pub fn validate_service_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > 63 {
        return Err(NameError::Length(name.to_string()));
    }
    let b = name.as_bytes();
    let ok = b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if !ok {
        return Err(NameError::Charset(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for ok in ["a", "hello", "hello-world-2"] {
            validate_service_name(ok).unwrap();
        }
        for bad in ["", "Hello", "1abc", "abc-", "a_b", "a.b", &"a".repeat(64)] {
            assert!(validate_service_name(bad).is_err(), "{bad:?}");
        }
    }
}
