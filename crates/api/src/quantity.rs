//! CPU and memory quantities as users write them (`500m`, `0.5`, `2`; `256Mi`, `1Gi`, `512M`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Errors from parsing a quantity; each names the input that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("cpu {0:?}: expected millicores like \"500m\" or cores like \"0.5\" or \"2\"")]
    CpuSyntax(String),
    #[error("cpu {0:?}: must be between 1m and 64 cores")]
    CpuRange(String),
    #[error("memory {0:?}: expected bytes with a unit like \"256Mi\", \"1Gi\" or \"512M\"")]
    MemorySyntax(String),
    #[error("memory {0:?}: must be between 4Mi and 1Ti")]
    MemoryRange(String),
}

/// CPU in millicores (1000 = one vCPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cpu(pub u32);

impl Cpu {
    pub const MAX_MILLIS: u32 = 64_000;

    pub fn millis(self) -> u32 {
        self.0
    }
}

impl FromStr for Cpu {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let syntax = || QuantityError::CpuSyntax(s.to_string());
        let millis: u64 = if let Some(m) = t.strip_suffix('m') {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            m.parse().map_err(|_| syntax())?
        } else {
            parse_decimal_scaled(t, 1000).ok_or_else(syntax)?
        };
        if millis == 0 || millis > u64::from(Self::MAX_MILLIS) {
            return Err(QuantityError::CpuRange(s.to_string()));
        }
        Ok(Cpu(millis as u32))
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}m", self.0)
        }
    }
}

/// Memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Memory(pub u64);

impl Memory {
    pub const MIN: u64 = 4 << 20;
    pub const MAX: u64 = 1 << 40;

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for Memory {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = parse_bytes(s).ok_or_else(|| QuantityError::MemorySyntax(s.to_string()))?;
        if !(Self::MIN..=Self::MAX).contains(&bytes) {
            return Err(QuantityError::MemoryRange(s.to_string()));
        }
        Ok(Memory(bytes))
    }
}

/// A size in bytes written as Kubernetes writes quantities: `512`, `64Ki`, `10Mi`, `1.5Gi`,
/// `2G`; `None` when the syntax is wrong or it is not a whole number of bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    parse_decimal_scaled(num, mult)
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "Ti"),
            (1 << 30, "Gi"),
            (1 << 20, "Mi"),
            (1 << 10, "Ki"),
        ];
        for (m, u) in UNITS {
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{u}", self.0 / m);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Parses a non-negative decimal (`"0.5"`, `"2"`) times `scale`, exactly; `None` when the
/// syntax is wrong, the result is not a whole number, or it overflows.
fn parse_decimal_scaled(s: &str, scale: u64) -> Option<u64> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.contains('.') && frac.is_empty() {
        return None;
    }
    let int_v: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut total = int_v.checked_mul(scale)?;
    if !frac.is_empty() {
        if frac.len() > 18 {
            return None;
        }
        let frac_v: u128 = frac.parse().ok()?;
        let denom = 10u128.pow(frac.len() as u32);
        let num = frac_v * u128::from(scale);
        if !num.is_multiple_of(denom) {
            return None;
        }
        total = total.checked_add(u64::try_from(num / denom).ok()?)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cpu_forms() {
        assert_eq!("500m".parse::<Cpu>().unwrap(), Cpu(500));
        assert_eq!("0.5".parse::<Cpu>().unwrap(), Cpu(500));
        assert_eq!("2".parse::<Cpu>().unwrap(), Cpu(2000));
        assert_eq!(".25".parse::<Cpu>().unwrap(), Cpu(250));
        for bad in ["", "m", "-1", "1.", "0.0001", "abc", "1.5m", "0", "65"] {
            assert!(bad.parse::<Cpu>().is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn memory_forms() {
        assert_eq!("256Mi".parse::<Memory>().unwrap(), Memory(256 << 20));
        assert_eq!("1Gi".parse::<Memory>().unwrap(), Memory(1 << 30));
        assert_eq!("512M".parse::<Memory>().unwrap(), Memory(512_000_000));
        assert_eq!("1.5Gi".parse::<Memory>().unwrap(), Memory(3 << 29));
        for bad in ["", "Mi", "12Qi", "-1Mi", "1Ki", "2Ti"] {
            assert!(bad.parse::<Memory>().is_err(), "{bad:?} should fail");
        }
    }

    proptest! {
        #[test]
        fn cpu_display_roundtrips(m in 1u32..=64_000) {
            let c = Cpu(m);
            prop_assert_eq!(c.to_string().parse::<Cpu>().unwrap(), c);
        }

        #[test]
        fn memory_display_roundtrips(b in Memory::MIN..=Memory::MAX) {
            let m = Memory(b);
            prop_assert_eq!(m.to_string().parse::<Memory>().unwrap(), m);
        }
    }
}
