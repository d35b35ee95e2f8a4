//! Human-readable byte sizes: `1GiB`, `512MiB`, `4096`, as used on the CLI and
//! in config files.

use std::fmt;

/// Why a size string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error(
        "size {0:?} is not a number with an optional unit: use e.g. 1GiB, 512MiB or 1073741824"
    )]
    Malformed(String),
    #[error("size {0:?} has unknown unit {1:?}: use B, KiB, MiB, GiB, TiB (or K, M, G, T)")]
    UnknownUnit(String, String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses `N`, `N<unit>` with binary units (`KiB`/`K`/`Ki`, `MiB`, `GiB`, `TiB`;
/// decimal `KB`/`MB`/`GB`/`TB` too). Whitespace between number and unit is allowed.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(SizeError::Malformed(s.to_string()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_string()))?;
    let mult: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "k" | "Ki" | "KiB" => 1 << 10,
        "M" | "Mi" | "MiB" => 1 << 20,
        "G" | "Gi" | "GiB" => 1 << 30,
        "T" | "Ti" | "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => return Err(SizeError::UnknownUnit(s.to_string(), other.to_string())),
    };
    n.checked_mul(mult)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// Formats bytes with the largest binary unit that divides them exactly
/// (`1GiB`, `1536MiB`), else one decimal in the largest unit below them.
pub struct HumanSize(pub u64);

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        let n = self.0;
        if let Some((name, unit)) = UNITS.iter().find(|(_, u)| n >= *u && n % u == 0) {
            return write!(f, "{}{}", n / unit, name);
        }
        match UNITS.iter().find(|(_, u)| n >= *u) {
            Some((name, unit)) => write!(f, "{:.1}{}", n as f64 / *unit as f64, name),
            None => write!(f, "{n}B"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2 G"), Ok(2 << 30));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(parse_size(""), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("GiB"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("1XB"), Err(SizeError::UnknownUnit(..))));
        assert!(matches!(
            parse_size("99999999999TiB"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats() {
        assert_eq!(HumanSize(1 << 30).to_string(), "1GiB");
        assert_eq!(HumanSize(1536 << 20).to_string(), "1536MiB");
        assert_eq!(HumanSize(100).to_string(), "100B");
        assert_eq!(HumanSize((3 << 29) + 1).to_string(), "1.5GiB");
    }
}
