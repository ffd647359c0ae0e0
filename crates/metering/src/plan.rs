//! Price plans: the default plan and TOML plan files. Prices are exact decimal strings; the
//! plan names its units explicitly (what a "GB" is for memory and for egress, the billing
//! increment of time and of memory).

use crate::money::{self, MoneyError, PICO_PER_MICRO};
use serde::{Deserialize, Serialize};

/// Milliseconds per second and per hour.
const MS_PER_SECOND: u128 = 1_000;
const MS_PER_HOUR: u128 = 3_600_000;
/// Millicores per vCPU.
const MILLIS_PER_VCPU: u128 = 1_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("price plan: {0}")]
    Toml(String),
    #[error("price plan key {key}: {source}")]
    Price {
        key: &'static str,
        source: MoneyError,
    },
    #[error("price plan key {key} = {value:?}: expected {expected}")]
    Invalid {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// The time unit a CPU or memory price is quoted per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PerTime {
    Second,
    Hour,
}

impl PerTime {
    fn ms(self) -> u128 {
        match self {
            PerTime::Second => MS_PER_SECOND,
            PerTime::Hour => MS_PER_HOUR,
        }
    }
    fn name(self) -> &'static str {
        match self {
            PerTime::Second => "second",
            PerTime::Hour => "hour",
        }
    }
}

/// A price as an exact rational: `pico` pico-dollars per `per` base units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub pico: u128,
    pub per: u128,
}

impl Rate {
    /// The amount for `quantity` base units in micro-dollars, rounded half up once.
    /// `None` on overflow (a quantity beyond any real bill).
    pub fn amount_micros(&self, quantity: u128) -> Option<u64> {
        let num = quantity.checked_mul(self.pico)?;
        let den = self.per.checked_mul(PICO_PER_MICRO)?;
        u64::try_from(money::div_round_half_up(num, den)).ok()
    }
}

/// A validated price plan. Base units of usage: millicore-milliseconds (CPU), byte-milliseconds
/// (memory, after rounding the allocation up to `memory_increment_bytes`), requests, bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricePlan {
    pub name: String,
    pub currency: String,
    /// Billable time of each instance is rounded up to a multiple of this (default 100 ms).
    pub time_increment_ms: u64,
    pub cpu_price_pico: u128,
    pub cpu_price_per: PerTime,
    pub memory_price_pico: u128,
    pub memory_price_per: PerTime,
    /// What one "GB" of memory is in the memory price (default 2^30: a GiB).
    pub memory_gb_bytes: u64,
    /// Memory allocations are billed rounded up to a multiple of this (default 256 MiB).
    pub memory_increment_bytes: u64,
    pub request_price_pico: u128,
    /// The request price is per this many requests (default one million).
    pub request_price_per: u64,
    pub egress_price_pico: u128,
    /// What one "GB" of egress is (default 10^9 bytes).
    pub egress_gb_bytes: u64,
    /// Free egress per calendar month (UTC), in egress GB (default 100).
    pub egress_free_gb_per_month: u64,
}

impl Default for PricePlan {
    /// The default plan: $0.075 per vCPU-hour, $0.06 per GiB-hour, $0.20 per million requests,
    /// egress $0.09 per GB (10^9 bytes) after 100 GB free each month. See docs/billing.md.
    fn default() -> Self {
        PricePlan {
            name: "default".into(),
            currency: "USD".into(),
            time_increment_ms: 100,
            cpu_price_pico: 75_000_000_000,
            cpu_price_per: PerTime::Hour,
            memory_price_pico: 60_000_000_000,
            memory_price_per: PerTime::Hour,
            memory_gb_bytes: 1 << 30,
            memory_increment_bytes: 256 << 20,
            request_price_pico: 200_000_000_000,
            request_price_per: 1_000_000,
            egress_price_pico: 90_000_000_000,
            egress_gb_bytes: 1_000_000_000,
            egress_free_gb_per_month: 100,
        }
    }
}

/// The TOML form. Every key is optional (missing keys keep the default plan's value); prices
/// are strings so they stay exact.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    name: Option<String>,
    currency: Option<String>,
    time_increment_ms: Option<u64>,
    cpu_price: Option<toml::Value>,
    cpu_price_per: Option<PerTime>,
    memory_price: Option<toml::Value>,
    memory_price_per: Option<PerTime>,
    memory_gb_bytes: Option<u64>,
    memory_increment_bytes: Option<u64>,
    request_price: Option<toml::Value>,
    request_price_per: Option<u64>,
    egress_price: Option<toml::Value>,
    egress_gb_bytes: Option<u64>,
    egress_free_gb_per_month: Option<u64>,
}

fn price(key: &'static str, v: Option<toml::Value>, default: u128) -> Result<u128, PlanError> {
    match v {
        None => Ok(default),
        Some(toml::Value::String(s)) => {
            money::parse_dollars_pico(&s).map_err(|source| PlanError::Price { key, source })
        }
        Some(toml::Value::Integer(i)) if i >= 0 => money::parse_dollars_pico(&i.to_string())
            .map_err(|source| PlanError::Price { key, source }),
        Some(other) => Err(PlanError::Invalid {
            key,
            value: other.to_string(),
            expected: "a price in dollars as a string, like \"0.075\" (floats are inexact)",
        }),
    }
}

fn positive(key: &'static str, v: Option<u64>, default: u64) -> Result<u64, PlanError> {
    match v {
        None => Ok(default),
        Some(0) => Err(PlanError::Invalid {
            key,
            value: "0".into(),
            expected: "a positive integer",
        }),
        Some(n) => Ok(n),
    }
}

impl PricePlan {
    /// Parses a TOML plan file's text; keys not given keep the default plan's values.
    pub fn from_toml(text: &str) -> Result<PricePlan, PlanError> {
        let f: PlanFile =
            toml::from_str(text).map_err(|e| PlanError::Toml(e.message().to_string()))?;
        let d = PricePlan::default();
        let plan = PricePlan {
            name: f.name.unwrap_or(d.name),
            currency: f.currency.unwrap_or(d.currency),
            time_increment_ms: positive(
                "time_increment_ms",
                f.time_increment_ms,
                d.time_increment_ms,
            )?,
            cpu_price_pico: price("cpu_price", f.cpu_price, d.cpu_price_pico)?,
            cpu_price_per: f.cpu_price_per.unwrap_or(d.cpu_price_per),
            memory_price_pico: price("memory_price", f.memory_price, d.memory_price_pico)?,
            memory_price_per: f.memory_price_per.unwrap_or(d.memory_price_per),
            memory_gb_bytes: positive("memory_gb_bytes", f.memory_gb_bytes, d.memory_gb_bytes)?,
            memory_increment_bytes: positive(
                "memory_increment_bytes",
                f.memory_increment_bytes,
                d.memory_increment_bytes,
            )?,
            request_price_pico: price("request_price", f.request_price, d.request_price_pico)?,
            request_price_per: positive(
                "request_price_per",
                f.request_price_per,
                d.request_price_per,
            )?,
            egress_price_pico: price("egress_price", f.egress_price, d.egress_price_pico)?,
            egress_gb_bytes: positive("egress_gb_bytes", f.egress_gb_bytes, d.egress_gb_bytes)?,
            egress_free_gb_per_month: f
                .egress_free_gb_per_month
                .unwrap_or(d.egress_free_gb_per_month),
        };
        if plan.currency.len() != 3 || !plan.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(PlanError::Invalid {
                key: "currency",
                value: plan.currency,
                expected: "a three-letter ISO 4217 code like \"USD\"",
            });
        }
        Ok(plan)
    }

    /// CPU rate over millicore-milliseconds.
    pub fn cpu_rate(&self) -> Rate {
        Rate {
            pico: self.cpu_price_pico,
            per: MILLIS_PER_VCPU * self.cpu_price_per.ms(),
        }
    }

    /// Memory rate over byte-milliseconds (of the rounded-up allocation).
    pub fn memory_rate(&self) -> Rate {
        Rate {
            pico: self.memory_price_pico,
            per: u128::from(self.memory_gb_bytes) * self.memory_price_per.ms(),
        }
    }

    pub fn request_rate(&self) -> Rate {
        Rate {
            pico: self.request_price_pico,
            per: u128::from(self.request_price_per),
        }
    }

    /// Egress rate over bytes (after the free allowance).
    pub fn egress_rate(&self) -> Rate {
        Rate {
            pico: self.egress_price_pico,
            per: u128::from(self.egress_gb_bytes),
        }
    }

    pub fn egress_free_bytes_per_month(&self) -> u128 {
        u128::from(self.egress_free_gb_per_month) * u128::from(self.egress_gb_bytes)
    }

    /// A memory allocation rounded up to the billing increment.
    pub fn billable_memory_bytes(&self, bytes: u64) -> u128 {
        let inc = u128::from(self.memory_increment_bytes);
        money::div_ceil(u128::from(bytes), inc) * inc
    }

    /// An instance's lifetime rounded up to the time increment.
    pub fn billable_ms(&self, ms: u64) -> u64 {
        ms.div_ceil(self.time_increment_ms)
            .saturating_mul(self.time_increment_ms)
    }

    pub fn cpu_unit_price(&self) -> String {
        format!(
            "${} per vCPU-{}",
            money::price_string(self.cpu_price_pico),
            self.cpu_price_per.name()
        )
    }

    pub fn memory_unit_price(&self) -> String {
        format!(
            "${} per GB-{}",
            money::price_string(self.memory_price_pico),
            self.memory_price_per.name()
        )
    }

    pub fn request_unit_price(&self) -> String {
        let per = match self.request_price_per {
            1 => "request".to_string(),
            1_000_000 => "million requests".to_string(),
            n => format!("{n} requests"),
        };
        format!(
            "${} per {per}",
            money::price_string(self.request_price_pico)
        )
    }

    pub fn egress_unit_price(&self) -> String {
        format!(
            "${} per GB after {} GB free per month",
            money::price_string(self.egress_price_pico),
            self.egress_free_gb_per_month
        )
    }

    /// The exact per-second prices, as decimal strings with 12 places (display only).
    pub fn per_second_prices(&self) -> (String, String) {
        let per_second = |pico: u128, per: PerTime| {
            money::ratio_string(pico * MS_PER_SECOND, per.ms() * money::PICO_PER_DOLLAR, 12)
        };
        (
            per_second(self.cpu_price_pico, self.cpu_price_per),
            per_second(self.memory_price_pico, self.memory_price_per),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan_rates_are_the_quoted_hourly_prices() {
        let p = PricePlan::default();
        // One vCPU for one hour = 1000 mc × 3.6e6 ms → $0.075.
        assert_eq!(p.cpu_rate().amount_micros(1000 * 3_600_000), Some(75_000));
        // One GiB for one hour → $0.06.
        assert_eq!(
            p.memory_rate().amount_micros((1u128 << 30) * 3_600_000),
            Some(60_000)
        );
        // Per second they display as the rounded per-second prices.
        let (cpu, mem) = p.per_second_prices();
        assert_eq!(cpu, "0.000020833333");
        assert_eq!(mem, "0.000016666667");
        assert_eq!(p.request_rate().amount_micros(1_000_000), Some(200_000));
        assert_eq!(p.egress_rate().amount_micros(1_000_000_000), Some(90_000));
    }

    #[test]
    fn toml_overrides_and_errors_name_the_key() {
        let p = PricePlan::from_toml(
            "name = \"per-second\"\ncpu_price = \"0.00002083\"\ncpu_price_per = \"second\"\nmemory_gb_bytes = 1000000000\n",
        )
        .unwrap();
        assert_eq!(p.name, "per-second");
        assert_eq!(p.cpu_price_pico, 20_830_000);
        assert_eq!(p.cpu_price_per, PerTime::Second);
        assert_eq!(p.memory_gb_bytes, 1_000_000_000);
        assert_eq!(
            p.request_price_pico,
            PricePlan::default().request_price_pico
        );

        let e = PricePlan::from_toml("cpu_price = 0.075\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cpu_price") && e.contains("floats are inexact"),
            "{e}"
        );
        let e = PricePlan::from_toml("cpu_price = \"abc\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cpu_price") && e.contains("\"abc\""), "{e}");
        let e = PricePlan::from_toml("time_increment_ms = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("time_increment_ms"), "{e}");
        let e = PricePlan::from_toml("cpu_prize = \"1\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cpu_prize"), "{e}");
        let e = PricePlan::from_toml("cpu_price_per = \"minute\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("minute"), "{e}");
        let e = PricePlan::from_toml("currency = \"usd\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("currency"), "{e}");
        assert_eq!(
            PricePlan::from_toml("request_price = 1\n")
                .unwrap()
                .request_price_pico,
            money::PICO_PER_DOLLAR
        );
    }

    #[test]
    fn memory_and_time_round_up() {
        let p = PricePlan::default();
        assert_eq!(p.billable_memory_bytes(2_000_000_000), 2 << 30);
        assert_eq!(p.billable_memory_bytes(2 << 30), 2 << 30);
        assert_eq!(
            p.billable_memory_bytes((2 << 30) + 1),
            (2 << 30) + (256 << 20)
        );
        assert_eq!(p.billable_memory_bytes(0), 0);
        assert_eq!(p.billable_ms(0), 0);
        assert_eq!(p.billable_ms(1), 100);
        assert_eq!(p.billable_ms(100), 100);
        assert_eq!(p.billable_ms(101), 200);
    }
}
