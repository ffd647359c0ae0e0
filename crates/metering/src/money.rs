//! Exact money arithmetic: prices parsed from decimal strings into pico-dollars, amounts in
//! micro-dollars, one half-up rounding at the end of each line item. No floats.

use serde::{Deserialize, Serialize};
use std::fmt;

/// 10^12 pico-dollars per dollar: prices carry 12 decimal places exactly.
pub const PICO_PER_DOLLAR: u128 = 1_000_000_000_000;
/// 10^6 micro-dollars per dollar: line items and totals.
pub const MICRO_PER_DOLLAR: u128 = 1_000_000;
/// Pico-dollars per micro-dollar.
pub const PICO_PER_MICRO: u128 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount {0:?}: expected a decimal number of dollars like \"0.075\"")]
    Syntax(String),
    #[error("amount {0:?}: more than 12 decimal places")]
    TooPrecise(String),
    #[error("amount {0:?}: too large")]
    TooLarge(String),
}

/// Parses a non-negative decimal dollar amount (`"0.075"`, `"$0.20"`, `"12"`) into
/// pico-dollars, exactly.
pub fn parse_dollars_pico(s: &str) -> Result<u128, MoneyError> {
    let t = s.trim();
    let t = t.strip_prefix('$').unwrap_or(t);
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || (t.ends_with('.')) {
        return Err(MoneyError::Syntax(s.to_string()));
    }
    if frac.len() > 12 {
        return Err(MoneyError::TooPrecise(s.to_string()));
    }
    let too_large = || MoneyError::TooLarge(s.to_string());
    let int_v: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_large())?
    };
    if int_v > 1_000_000_000_000 {
        return Err(too_large());
    }
    let frac_v: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| too_large())?
    };
    let frac_pico = frac_v * 10u128.pow(12 - frac.len() as u32);
    Ok(int_v * PICO_PER_DOLLAR + frac_pico)
}

/// `num / den` rounded half up (ties away from zero). `den` must be non-zero.
pub fn div_round_half_up(num: u128, den: u128) -> u128 {
    let q = num / den;
    let r = num % den;
    // r >= den - r  ⇔  2r >= den, without overflowing 2r.
    if r >= den - r { q + 1 } else { q }
}

/// `num / den` rounded up. `den` must be non-zero.
pub fn div_ceil(num: u128, den: u128) -> u128 {
    num.div_ceil(den)
}

/// Renders `num / den` as a decimal with at most `decimals` places (half-up), trailing zeros
/// trimmed: `ratio_string(15, 10, 3) == "1.5"`. Display only.
pub fn ratio_string(num: u128, den: u128, decimals: u32) -> String {
    let scale = 10u128.pow(decimals);
    let scaled = num
        .checked_mul(scale)
        .map(|n| div_round_half_up(n, den))
        .unwrap_or_else(|| num / den * scale);
    let int = scaled / scale;
    let frac = scaled % scale;
    if decimals == 0 || frac == 0 {
        return int.to_string();
    }
    let f = format!("{frac:0width$}", width = decimals as usize);
    format!("{int}.{}", f.trim_end_matches('0'))
}

/// An amount of money in micro-dollars (10^-6 USD). Displays as `$21.50`, or with up to six
/// decimals when it is not a whole number of cents (`$0.000017`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Micros(pub u64);

impl Micros {
    pub fn dollars_string(self) -> String {
        let int = self.0 / 1_000_000;
        let frac = self.0 % 1_000_000;
        if frac.is_multiple_of(10_000) {
            format!("{int}.{:02}", frac / 10_000)
        } else {
            let f = format!("{frac:06}");
            format!("{int}.{}", f.trim_end_matches('0'))
        }
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}", self.dollars_string())
    }
}

impl std::ops::Add for Micros {
    type Output = Micros;
    fn add(self, rhs: Micros) -> Micros {
        Micros(self.0.saturating_add(rhs.0))
    }
}

impl std::iter::Sum for Micros {
    fn sum<I: Iterator<Item = Micros>>(iter: I) -> Micros {
        iter.fold(Micros(0), |a, b| a + b)
    }
}

/// Renders pico-dollars as a decimal dollar string, exact, trailing zeros trimmed
/// (`75_000_000_000` → `"0.075"`).
pub fn pico_string(pico: u128) -> String {
    ratio_string(pico, PICO_PER_DOLLAR, 12)
}

/// Like [`pico_string`] but with at least two decimals, for prices shown to people (`"0.20"`).
pub fn price_string(pico: u128) -> String {
    let s = pico_string(pico);
    match s.split_once('.') {
        None => format!("{s}.00"),
        Some((_, f)) if f.len() == 1 => format!("{s}0"),
        Some(_) => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_prices_exactly() {
        assert_eq!(parse_dollars_pico("0.075").unwrap(), 75_000_000_000);
        assert_eq!(parse_dollars_pico("$0.20").unwrap(), 200_000_000_000);
        assert_eq!(parse_dollars_pico("12").unwrap(), 12 * PICO_PER_DOLLAR);
        assert_eq!(parse_dollars_pico(".5").unwrap(), PICO_PER_DOLLAR / 2);
        assert_eq!(parse_dollars_pico("0.000000000001").unwrap(), 1);
        assert!(matches!(
            parse_dollars_pico("0.0000000000001"),
            Err(MoneyError::TooPrecise(_))
        ));
        for bad in ["", ".", "1.", "-1", "1e3", "abc", "1.2.3", "$"] {
            assert!(
                matches!(parse_dollars_pico(bad), Err(MoneyError::Syntax(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_dollars_pico("99999999999999999999999"),
            Err(MoneyError::TooLarge(_))
        ));
    }

    #[test]
    fn rounding_is_half_up() {
        assert_eq!(div_round_half_up(5, 10), 1);
        assert_eq!(div_round_half_up(4, 10), 0);
        assert_eq!(div_round_half_up(15, 10), 2);
        assert_eq!(div_round_half_up(14, 10), 1);
        assert_eq!(div_round_half_up(u128::MAX, u128::MAX), 1);
        assert_eq!(div_round_half_up(u128::MAX, 2), u128::MAX / 2 + 1);
        assert_eq!(div_ceil(101, 100), 2);
        assert_eq!(div_ceil(100, 100), 1);
    }

    #[test]
    fn display_forms() {
        assert_eq!(Micros(21_500_000).to_string(), "$21.50");
        assert_eq!(Micros(0).to_string(), "$0.00");
        assert_eq!(Micros(17).to_string(), "$0.000017");
        assert_eq!(Micros(7_498_800).to_string(), "$7.4988");
        assert_eq!(pico_string(75_000_000_000), "0.075");
        assert_eq!(price_string(200_000_000_000), "0.20");
        assert_eq!(price_string(2 * PICO_PER_DOLLAR), "2.00");
        assert_eq!(price_string(75_000_000_000), "0.075");
        assert_eq!(ratio_string(2, 3, 6), "0.666667");
        assert_eq!(ratio_string(360_000, 1, 3), "360000");
    }

    proptest! {
        #[test]
        fn half_up_is_within_half(num in any::<u64>(), den in 1u64..) {
            let (n, d) = (u128::from(num), u128::from(den));
            let q = div_round_half_up(n, d);
            // |q·d − n| ≤ d/2, and ties go up.
            let diff = (q * d).abs_diff(n);
            prop_assert!(2 * diff <= d);
            if 2 * diff == d { prop_assert!(q * d > n); }
        }

        #[test]
        fn price_strings_roundtrip(pico in 0u128..1_000_000_000_000_000_000) {
            prop_assert_eq!(parse_dollars_pico(&pico_string(pico)).unwrap(), pico);
        }
    }
}
