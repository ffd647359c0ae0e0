//! Usage events (what control stores, keyed by an idempotent id) and calendar months (UTC).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One usage fact. `id` makes recording idempotent: the same event sent twice counts once; two
/// different events under one id are an error. An instance is one event, upserted by control:
/// first with `stop_ms: None` when it starts, then with its stop time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    pub id: String,
    #[serde(flatten)]
    pub kind: UsageKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UsageKind {
    /// An instance's lifetime × its CPU and memory allocation. Times are Unix milliseconds.
    Instance {
        service: String,
        instance: String,
        start_ms: u64,
        #[serde(default)]
        stop_ms: Option<u64>,
        cpu_millis: u32,
        memory_bytes: u64,
    },
    /// `count` requests served for a service, counted at `at_ms`.
    Requests {
        service: String,
        at_ms: u64,
        count: u64,
    },
    /// `bytes` sent to clients by a service, counted at `at_ms`.
    Egress {
        service: String,
        at_ms: u64,
        bytes: u64,
    },
}

impl UsageEvent {
    pub fn service(&self) -> &str {
        match &self.kind {
            UsageKind::Instance { service, .. }
            | UsageKind::Requests { service, .. }
            | UsageKind::Egress { service, .. } => service,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MonthError {
    #[error("month {0:?}: expected YYYY-MM like \"2026-11\"")]
    Syntax(String),
    #[error("month {0:?}: must be between 1970-01 and 9999-12")]
    Range(String),
    #[error("time {0:?}: expected Unix milliseconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)")]
    Instant(String),
}

/// A calendar month in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    pub year: u16,
    /// 1..=12
    pub month: u8,
}

/// Days from 1970-01-01 to the first day of (year, month), proleptic Gregorian.
fn days_from_civil(year: i64, month: i64) -> i64 {
    // Howard Hinnant's algorithm, day = 1.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const MS_PER_DAY: u64 = 86_400_000;

impl Month {
    pub fn new(year: u16, month: u8) -> Result<Month, MonthError> {
        let m = Month { year, month };
        if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) {
            return Err(MonthError::Range(m.to_string()));
        }
        Ok(m)
    }

    /// First millisecond of the month (Unix ms, UTC).
    pub fn start_ms(self) -> u64 {
        days_from_civil(i64::from(self.year), i64::from(self.month)) as u64 * MS_PER_DAY
    }

    /// First millisecond of the next month.
    pub fn end_ms(self) -> u64 {
        self.next().start_ms()
    }

    pub fn next(self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The month containing Unix millisecond `ms`.
    pub fn containing(ms: u64) -> Month {
        // Estimate from the average month length, then correct.
        let mut m = {
            let months = ms / (MS_PER_DAY * 30_436_875 / 1_000_000);
            let year = 1970 + months / 12;
            Month {
                year: year.min(9999) as u16,
                month: (months % 12) as u8 + 1,
            }
        };
        while m.start_ms() > ms && (m.year, m.month) != (1970, 1) {
            m = m.prev();
        }
        while m.end_ms() <= ms && m.year < 9999 {
            m = m.next();
        }
        m
    }

    pub fn prev(self) -> Month {
        if self.month == 1 {
            Month {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Month {
                year: self.year,
                month: self.month - 1,
            }
        }
    }
}

/// Parses an instant for `--from`/`--to`: Unix milliseconds (`1793491200000`), a UTC date
/// (`2026-11-01`, its midnight), or `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_instant_ms(s: &str) -> Result<u64, MonthError> {
    let t = s.trim();
    let syntax = || MonthError::Instant(s.to_string());
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map_err(|_| syntax());
    }
    let (date, time) = match t.split_once('T') {
        Some((d, rest)) => (d, Some(rest.strip_suffix('Z').ok_or_else(syntax)?)),
        None => (t, None),
    };
    let num = |x: &str, len: usize| -> Result<u64, MonthError> {
        if x.len() != len || !x.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        x.parse().map_err(|_| syntax())
    };
    let mut parts = date.split('-');
    let (y, m, d) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(y), Some(m), Some(d), None) => (num(y, 4)?, num(m, 2)?, num(d, 2)?),
        _ => return Err(syntax()),
    };
    let month = Month::new(y as u16, m as u8).map_err(|_| syntax())?;
    let days_in_month = (month.end_ms() - month.start_ms()) / MS_PER_DAY;
    if d == 0 || d > days_in_month {
        return Err(syntax());
    }
    let mut ms = month.start_ms() + (d - 1) * MS_PER_DAY;
    if let Some(time) = time {
        let mut hms = time.split(':');
        let (h, mi, se) = match (hms.next(), hms.next(), hms.next(), hms.next()) {
            (Some(h), Some(mi), Some(se), None) => (num(h, 2)?, num(mi, 2)?, num(se, 2)?),
            _ => return Err(syntax()),
        };
        if h > 23 || mi > 59 || se > 59 {
            return Err(syntax());
        }
        ms += ((h * 60 + mi) * 60 + se) * 1000;
    }
    Ok(ms)
}

impl FromStr for Month {
    type Err = MonthError;
    fn from_str(s: &str) -> Result<Month, MonthError> {
        let syntax = || MonthError::Syntax(s.to_string());
        let (y, m) = s.trim().split_once('-').ok_or_else(syntax)?;
        if y.len() != 4 || m.len() != 2 || !y.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let year: u16 = y.parse().map_err(|_| syntax())?;
        let month: u8 = m.parse().map_err(|_| syntax())?;
        Month::new(year, month).map_err(|_| MonthError::Range(s.to_string()))
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl Serialize for Month {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Month {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Month, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn month_boundaries_match_the_calendar() {
        assert_eq!(Month::new(1970, 1).unwrap().start_ms(), 0);
        // 2026-11-01T00:00:00Z = 1793491200.
        assert_eq!(
            "2026-11".parse::<Month>().unwrap().start_ms(),
            1_793_491_200_000
        );
        // 2024 is a leap year: February has 29 days.
        let feb = Month::new(2024, 2).unwrap();
        assert_eq!(feb.end_ms() - feb.start_ms(), 29 * MS_PER_DAY);
        assert_eq!(
            Month::new(2023, 2).unwrap().end_ms() - Month::new(2023, 2).unwrap().start_ms(),
            28 * MS_PER_DAY
        );
        assert_eq!(
            Month::new(2026, 12).unwrap().next(),
            Month::new(2027, 1).unwrap()
        );
        for bad in ["2026-13", "1969-12", "2026-00"] {
            assert!(
                matches!(bad.parse::<Month>(), Err(MonthError::Range(_))),
                "{bad}"
            );
        }
        for bad in ["2026-1", "26-11", "2026/11", "", "abcd-ef"] {
            assert!(
                matches!(bad.parse::<Month>(), Err(MonthError::Syntax(_))),
                "{bad}"
            );
        }
        assert_eq!(Month::new(2026, 3).unwrap().to_string(), "2026-03");
    }

    #[test]
    fn instants_parse() {
        assert_eq!(parse_instant_ms("2026-11-01").unwrap(), 1_793_491_200_000);
        assert_eq!(
            parse_instant_ms("2026-11-01T01:00:01Z").unwrap(),
            1_793_491_200_000 + 3_601_000
        );
        assert_eq!(
            parse_instant_ms("1793491200000").unwrap(),
            1_793_491_200_000
        );
        assert_eq!(
            parse_instant_ms("2024-02-29").unwrap(),
            Month::new(2024, 2).unwrap().start_ms() + 28 * MS_PER_DAY
        );
        for bad in [
            "2023-02-29",
            "2026-11-01T24:00:00Z",
            "2026-11-01T01:00:00",
            "2026-11",
            "",
            "x",
            "2026-11-01T1:00:00Z",
        ] {
            assert!(
                matches!(parse_instant_ms(bad), Err(MonthError::Instant(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn events_serialize_flat_with_a_kind_tag() {
        let e = UsageEvent {
            id: "i-1".into(),
            kind: UsageKind::Egress {
                service: "hello".into(),
                at_ms: 5,
                bytes: 10,
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "i-1", "kind": "egress", "service": "hello", "at_ms": 5, "bytes": 10})
        );
        assert_eq!(serde_json::from_value::<UsageEvent>(v).unwrap(), e);
        let open: UsageEvent = serde_json::from_str(
            r#"{"id":"x","kind":"instance","service":"s","instance":"i","start_ms":1,"cpu_millis":500,"memory_bytes":1}"#,
        )
        .unwrap();
        assert!(matches!(
            open.kind,
            UsageKind::Instance { stop_ms: None, .. }
        ));
    }

    proptest! {
        #[test]
        fn containing_month_brackets_the_instant(ms in 0u64..253_402_300_799_000) {
            let m = Month::containing(ms);
            prop_assert!(m.start_ms() <= ms && ms < m.end_ms(), "{m} for {ms}");
            prop_assert_eq!(m.next().start_ms(), m.end_ms());
            prop_assert_eq!(m.to_string().parse::<Month>().unwrap(), m);
        }
    }
}
