//! Parsing of the estimator's inputs (`ferry price` flags, `GET /v1/price` query): hours with
//! decimals, request counts with k/M/B suffixes, egress with decimal or binary units. Exact:
//! integers only, no floats.

/// An input that does not parse; the message starts with the input's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// Splits a decimal like "2.5" into (digits as an integer, number of decimals).
fn decimal(s: &str) -> Option<(u128, u32)> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if (int.is_empty() && frac.is_empty())
        || s.ends_with('.')
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
        || frac.len() > 9
        || int.len() > 20
    {
        return None;
    }
    let digits: u128 = format!("{int}{frac}").parse().ok()?;
    Some((digits, frac.len() as u32))
}

/// Hours → milliseconds, rounded up to a whole millisecond.
pub fn parse_hours_ms(s: &str) -> Result<u64, InputError> {
    let (digits, scale) = decimal(s.trim()).ok_or_else(|| {
        InputError(format!(
            "hours {s:?}: expected a number like \"100\" or \"0.5\""
        ))
    })?;
    let ms = (digits * 3_600_000).div_ceil(10u128.pow(scale));
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms <= 100 * 365 * 24 * 3_600_000)
        .ok_or_else(|| InputError(format!("hours {s:?}: too large")))
}

fn scaled(s: &str, flag: &str, number: &str, mult: u128) -> Result<u64, InputError> {
    let (digits, scale) =
        decimal(number).ok_or_else(|| InputError(format!("{flag} {s:?}: expected a number")))?;
    let value = digits * mult;
    let den = 10u128.pow(scale);
    if !value.is_multiple_of(den) {
        return Err(InputError(format!("{flag} {s:?}: not a whole number")));
    }
    u64::try_from(value / den).map_err(|_| InputError(format!("{flag} {s:?}: too large")))
}

/// A request count → a count: "10M", "2.5k", "1B", "1200".
pub fn parse_count(s: &str) -> Result<u64, InputError> {
    let t = s.trim();
    let (number, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1_000),
        Some((i, 'M')) => (&t[..i], 1_000_000),
        Some((i, 'B' | 'G')) => (&t[..i], 1_000_000_000),
        _ => (t, 1),
    };
    scaled(s, "requests", number, mult)
}

/// Egress → bytes: decimal units (B, KB, MB, GB, TB; also k, M, G, T) or binary units
/// (KiB, MiB, GiB, TiB; also Ki, Mi, Gi, Ti).
pub fn parse_bytes(s: &str) -> Result<u64, InputError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let mult: u128 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        other => {
            return Err(InputError(format!(
                "egress {s:?}: unknown unit {other:?} (use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)"
            )));
        }
    };
    scaled(s, "egress", number, mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_parse_exactly() {
        assert_eq!(parse_hours_ms("100").unwrap(), 360_000_000);
        assert_eq!(parse_hours_ms("0.5").unwrap(), 1_800_000);
        assert_eq!(
            parse_hours_ms("0.0000001").unwrap(),
            1,
            "rounded up to a millisecond"
        );
        for bad in ["", "-1", "1h", "1.", "abc", "1e3"] {
            assert!(
                parse_hours_ms(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("hours"),
                "{bad}"
            );
        }
    }

    #[test]
    fn counts_and_bytes_parse() {
        assert_eq!(parse_count("10M").unwrap(), 10_000_000);
        assert_eq!(parse_count("2.5k").unwrap(), 2_500);
        assert_eq!(parse_count("1B").unwrap(), 1_000_000_000);
        assert_eq!(parse_count("0").unwrap(), 0);
        assert!(
            parse_count("1.5")
                .unwrap_err()
                .to_string()
                .contains("not a whole number")
        );
        assert!(parse_count("10X").is_err());
        assert_eq!(parse_bytes("150GB").unwrap(), 150_000_000_000);
        assert_eq!(parse_bytes("150GiB").unwrap(), 150 << 30);
        assert_eq!(parse_bytes("1.5G").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("42").unwrap(), 42);
        let e = parse_bytes("3PB").unwrap_err().to_string();
        assert!(e.starts_with("egress") && e.contains("PB"), "{e}");
        assert!(parse_bytes("GB").is_err());
    }
}
