//! Object names. Volumes, replicas and snapshots are named with DNS-1123
//! labels, as in Kubernetes, so a name is valid everywhere Cairn shows it.

/// Why a name was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{kind} name is empty: give a name of 1-{max} characters")]
    Empty { kind: &'static str, max: usize },
    #[error("{kind} name {name:?} is longer than {max} characters: use a shorter name")]
    TooLong {
        kind: &'static str,
        name: String,
        max: usize,
    },
    #[error(
        "{kind} name {name:?} is not a DNS-1123 label: use lower-case letters, digits and '-', starting and ending with a letter or digit"
    )]
    Invalid { kind: &'static str, name: String },
}

/// Longest volume name. Kubernetes allows 63 for a label; replica names add a
/// suffix to the volume name, so volumes keep room for it.
pub const MAX_VOLUME_NAME: usize = 52;

/// Checks `name` is a DNS-1123 label of at most `max` characters.
pub fn validate_label(kind: &'static str, name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind, max });
    }
    if name.len() > max {
        return Err(NameError::TooLong {
            kind,
            name: name.to_string(),
            max,
        });
    }
    let b = name.as_bytes();
    let ok_inner = b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !ok_inner || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err(NameError::Invalid {
            kind,
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Checks a volume name.
pub fn validate_volume_name(name: &str) -> Result<(), NameError> {
    validate_label("volume", name, MAX_VOLUME_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_labels() {
        for n in ["a", "vol-1", "0db", "pvc-3f2a"] {
            assert_eq!(validate_volume_name(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn rejects_non_labels() {
        for n in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "ä",
            &"x".repeat(MAX_VOLUME_NAME + 1),
        ] {
            assert!(validate_volume_name(n).is_err(), "{n}");
        }
    }
}
