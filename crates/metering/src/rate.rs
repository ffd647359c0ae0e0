//! Rating: usage events → quantities in base units per service over a time range → priced
//! line items, invoices, usage reports and quotes. Pure functions; `as_of_ms` stands for "now".
//!
//! Rules (docs/billing.md says why):
//! - An instance's billable time is its lifetime rounded up to the plan's increment (100 ms),
//!   once per instance. A lifetime crossing a range (month) boundary is split at the boundary;
//!   the rounding remainder is charged where the instance stopped. An instance still running is
//!   charged up to `as_of_ms`, unrounded.
//! - Memory is billed on the allocation rounded up to the plan's memory increment.
//! - Free egress is a per-calendar-month allowance consumed by all services' egress events in
//!   time order (ties by event id); an event that crosses it is split into a free and a billed part.
//! - Each line item is rounded half up to a micro-dollar once, from its exact rational amount.

use crate::event::{Month, UsageEvent, UsageKind};
use crate::money::{self, Micros};
use crate::plan::PricePlan;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RatingError {
    #[error("usage event {0:?}: recorded twice with different contents")]
    ConflictingEvent(String),
    #[error("usage event {id:?}: {reason}")]
    InvalidEvent { id: String, reason: String },
    #[error("usage range {from_ms}..{to_ms}: the end must be after the start")]
    EmptyRange { from_ms: u64, to_ms: u64 },
    #[error("usage query: {0}")]
    Query(String),
    #[error("{0}: amount too large to rate")]
    Overflow(String),
}

/// What a line item charges for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    Cpu,
    Memory,
    Requests,
    Egress,
}

impl LineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LineKind::Cpu => "cpu",
            LineKind::Memory => "memory",
            LineKind::Requests => "requests",
            LineKind::Egress => "egress",
        }
    }
}

/// One priced line. `quantity` is for people (in `unit`); `base_quantity` is exact (in
/// `base_unit`) and is what was priced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    /// Empty (and left out of JSON) in a quote.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    pub kind: LineKind,
    pub quantity: String,
    pub unit: String,
    pub base_quantity: String,
    pub base_unit: String,
    /// Egress only: the part of `quantity` covered by the free allowance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_quantity: Option<String>,
    pub unit_price: String,
    pub amount_micros: Micros,
    pub amount: String,
}

/// A service's share of an invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceTotal {
    pub service: String,
    pub amount_micros: Micros,
    pub amount: String,
}

/// A month's bill: line items per service and kind, per-service subtotals, total.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    pub month: Month,
    pub plan: String,
    pub currency: String,
    pub lines: Vec<LineItem>,
    pub services: Vec<ServiceTotal>,
    pub total_micros: Micros,
    pub total: String,
}

/// Metered quantities and cost of one service over a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceUsage {
    pub service: String,
    pub vcpu_seconds: String,
    pub gb_seconds: String,
    pub requests: u64,
    pub egress_bytes: u64,
    pub egress_free_bytes: u64,
    pub cost_micros: Micros,
    pub cost: String,
}

/// `ferry usage`: metered quantities per service over `[from_ms, to_ms)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    pub from_ms: u64,
    pub to_ms: u64,
    pub plan: String,
    pub services: Vec<ServiceUsage>,
    pub total_micros: Micros,
    pub total: String,
}

/// The query of `GET /v1/usage` (`service`, and `month` or `from_ms`+`to_ms`), as control
/// deserializes it from the query string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageQuery {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub month: Option<Month>,
    #[serde(default)]
    pub from_ms: Option<u64>,
    #[serde(default)]
    pub to_ms: Option<u64>,
}

impl UsageQuery {
    /// The range `[from, to)` asked for: the month, the explicit range, or (neither) the month
    /// containing `now_ms`.
    pub fn range(&self, now_ms: u64) -> Result<(u64, u64), RatingError> {
        let bad = |reason: &str| Err(RatingError::Query(reason.to_string()));
        match (self.month, self.from_ms, self.to_ms) {
            (Some(m), None, None) => Ok((m.start_ms(), m.end_ms())),
            (None, Some(from), Some(to)) if to > from => Ok((from, to)),
            (None, Some(from), Some(to)) => Err(RatingError::EmptyRange {
                from_ms: from,
                to_ms: to,
            }),
            (None, None, None) => {
                let m = Month::containing(now_ms);
                Ok((m.start_ms(), m.end_ms()))
            }
            (Some(_), _, _) => bad("give month or from_ms and to_ms, not both"),
            _ => bad("from_ms and to_ms go together"),
        }
    }
}

/// A workload to estimate (`ferry price`): one instance running `duration_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Workload {
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub duration_ms: u64,
    pub requests: u64,
    pub egress_bytes: u64,
}

/// The estimate of a workload's cost (all four lines, even at zero).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    pub plan: String,
    pub currency: String,
    pub billable_ms: u64,
    pub billable_memory_bytes: u64,
    pub lines: Vec<LineItem>,
    pub total_micros: Micros,
    pub total: String,
}

/// Quantities of one service in base units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quantities {
    /// Millicore-milliseconds.
    pub cpu: u128,
    /// Byte-milliseconds of the rounded-up memory allocation.
    pub memory: u128,
    pub requests: u128,
    pub egress: u128,
    pub egress_free: u128,
}

/// Checks ids: identical repeats are dropped (idempotent recording), conflicting repeats and
/// malformed events are errors. Order of first occurrence is kept.
pub fn dedupe(events: &[UsageEvent]) -> Result<Vec<&UsageEvent>, RatingError> {
    let mut seen: HashMap<&str, &UsageEvent> = HashMap::new();
    let mut out = Vec::new();
    for e in events {
        if let Some(prev) = seen.get(e.id.as_str()) {
            if *prev != e {
                return Err(RatingError::ConflictingEvent(e.id.clone()));
            }
            continue;
        }
        validate(e)?;
        seen.insert(&e.id, e);
        out.push(e);
    }
    Ok(out)
}

fn validate(e: &UsageEvent) -> Result<(), RatingError> {
    let invalid = |reason: &str| {
        Err(RatingError::InvalidEvent {
            id: e.id.clone(),
            reason: reason.into(),
        })
    };
    if e.id.is_empty() {
        return invalid("empty id");
    }
    if e.service().is_empty() {
        return invalid("empty service name");
    }
    if let UsageKind::Instance {
        start_ms,
        stop_ms: Some(stop),
        ..
    } = &e.kind
        && stop < start_ms
    {
        return Err(RatingError::InvalidEvent {
            id: e.id.clone(),
            reason: format!("stop_ms {stop} is before start_ms {start_ms}"),
        });
    }
    Ok(())
}

/// An instance's billed milliseconds inside `[from, to)`: its lifetime split at the range
/// edges, plus the rounding remainder if it stopped inside the range.
pub fn instance_ms_in_range(
    plan: &PricePlan,
    start: u64,
    stop: Option<u64>,
    as_of: u64,
    from: u64,
    to: u64,
) -> u64 {
    let (end, rounded) = match stop {
        Some(s) => (s, true),
        None => (as_of.max(start), false),
    };
    let lo = start.max(from);
    let hi = end.min(to);
    let mut ms = hi.saturating_sub(lo);
    let raw = end - start;
    // The remainder goes to the range holding the instance's last millisecond, `end - 1`.
    if rounded && raw > 0 && from < end && end <= to {
        ms += plan.billable_ms(raw) - raw;
    }
    ms
}

/// Sums the quantities per service over `[from, to)`. `service` filters the output; the free
/// egress allowance is still consumed by every service's earlier egress in the month.
pub fn quantities(
    events: &[UsageEvent],
    plan: &PricePlan,
    from: u64,
    to: u64,
    as_of: u64,
    service: Option<&str>,
) -> Result<BTreeMap<String, Quantities>, RatingError> {
    if to <= from {
        return Err(RatingError::EmptyRange {
            from_ms: from,
            to_ms: to,
        });
    }
    let events = dedupe(events)?;
    let wanted = |s: &str| service.is_none_or(|w| w == s);
    let mut out: BTreeMap<String, Quantities> = BTreeMap::new();
    let overflow = |what: &str| RatingError::Overflow(what.to_string());
    let mut egress = Vec::new();
    for e in &events {
        match &e.kind {
            UsageKind::Instance {
                service: s,
                start_ms,
                stop_ms,
                cpu_millis,
                memory_bytes,
                ..
            } if wanted(s) => {
                let ms = u128::from(instance_ms_in_range(
                    plan, *start_ms, *stop_ms, as_of, from, to,
                ));
                if ms == 0 {
                    continue;
                }
                let q = out.entry(s.clone()).or_default();
                q.cpu = q
                    .cpu
                    .checked_add(ms * u128::from(*cpu_millis))
                    .ok_or_else(|| overflow("cpu"))?;
                let mem = ms
                    .checked_mul(plan.billable_memory_bytes(*memory_bytes))
                    .ok_or_else(|| overflow("memory"))?;
                q.memory = q
                    .memory
                    .checked_add(mem)
                    .ok_or_else(|| overflow("memory"))?;
            }
            UsageKind::Requests {
                service: s,
                at_ms,
                count,
            } if wanted(s) && (from..to).contains(at_ms) => {
                let q = out.entry(s.clone()).or_default();
                q.requests += u128::from(*count);
            }
            UsageKind::Egress { at_ms, bytes, .. } => {
                egress.push((*at_ms, e.id.as_str(), e.service(), *bytes))
            }
            _ => {}
        }
    }
    // Free allowance per calendar month, in time order across all services.
    egress.sort();
    let free = plan.egress_free_bytes_per_month();
    let mut used: HashMap<Month, u128> = HashMap::new();
    for (at, _, s, bytes) in egress {
        let month_used = used.entry(Month::containing(at)).or_default();
        let free_part = u128::from(bytes).min(free.saturating_sub(*month_used));
        *month_used += u128::from(bytes);
        if wanted(s) && (from..to).contains(&at) {
            let q = out.entry(s.to_string()).or_default();
            q.egress += u128::from(bytes);
            q.egress_free += free_part;
        }
    }
    Ok(out)
}

fn micros(amount: Option<u64>, what: &str) -> Result<Micros, RatingError> {
    amount
        .map(Micros)
        .ok_or_else(|| RatingError::Overflow(what.to_string()))
}

/// Prices one service's quantities: the four line items (zero ones dropped unless `keep_zero`).
pub fn line_items(
    plan: &PricePlan,
    service: &str,
    q: &Quantities,
    keep_zero: bool,
) -> Result<Vec<LineItem>, RatingError> {
    let mut lines = Vec::new();
    let mut push = |kind: LineKind,
                    quantity: String,
                    unit: &str,
                    base: u128,
                    base_unit: &str,
                    free: Option<String>,
                    price: String,
                    amount: Micros| {
        if base == 0 && !keep_zero {
            return;
        }
        lines.push(LineItem {
            service: service.to_string(),
            kind,
            quantity,
            unit: unit.into(),
            base_quantity: base.to_string(),
            base_unit: base_unit.into(),
            free_quantity: free,
            unit_price: price,
            amount_micros: amount,
            amount: amount.to_string(),
        });
    };
    let cpu = micros(plan.cpu_rate().amount_micros(q.cpu), "cpu")?;
    push(
        LineKind::Cpu,
        money::ratio_string(q.cpu, 1_000_000, 3),
        "vCPU-second",
        q.cpu,
        "millicore-ms",
        None,
        plan.cpu_unit_price(),
        cpu,
    );
    let mem = micros(plan.memory_rate().amount_micros(q.memory), "memory")?;
    let gb_ms = u128::from(plan.memory_gb_bytes) * 1000;
    push(
        LineKind::Memory,
        money::ratio_string(q.memory, gb_ms, 3),
        "GB-second",
        q.memory,
        "byte-ms",
        None,
        plan.memory_unit_price(),
        mem,
    );
    let req = micros(plan.request_rate().amount_micros(q.requests), "requests")?;
    push(
        LineKind::Requests,
        q.requests.to_string(),
        "requests",
        q.requests,
        "request",
        None,
        plan.request_unit_price(),
        req,
    );
    let billed = q.egress - q.egress_free;
    let eg = micros(plan.egress_rate().amount_micros(billed), "egress")?;
    let gb = u128::from(plan.egress_gb_bytes);
    push(
        LineKind::Egress,
        money::ratio_string(q.egress, gb, 6),
        "GB",
        q.egress,
        "byte",
        Some(money::ratio_string(q.egress_free, gb, 6)),
        plan.egress_unit_price(),
        eg,
    );
    Ok(lines)
}

/// The invoice of `month`: every service's line items, subtotals and the total.
pub fn invoice(
    events: &[UsageEvent],
    plan: &PricePlan,
    month: Month,
    as_of_ms: u64,
) -> Result<Invoice, RatingError> {
    let per_service = quantities(
        events,
        plan,
        month.start_ms(),
        month.end_ms(),
        as_of_ms,
        None,
    )?;
    let mut lines = Vec::new();
    let mut services = Vec::new();
    for (service, q) in &per_service {
        let l = line_items(plan, service, q, false)?;
        let sub: Micros = l.iter().map(|x| x.amount_micros).sum();
        services.push(ServiceTotal {
            service: service.clone(),
            amount_micros: sub,
            amount: sub.to_string(),
        });
        lines.extend(l);
    }
    let total: Micros = lines.iter().map(|l| l.amount_micros).sum();
    Ok(Invoice {
        month,
        plan: plan.name.clone(),
        currency: plan.currency.clone(),
        lines,
        services,
        total_micros: total,
        total: total.to_string(),
    })
}

/// Usage per service over `[from_ms, to_ms)`, optionally for one service.
pub fn usage(
    events: &[UsageEvent],
    plan: &PricePlan,
    from_ms: u64,
    to_ms: u64,
    service: Option<&str>,
    as_of_ms: u64,
) -> Result<UsageReport, RatingError> {
    let per_service = quantities(events, plan, from_ms, to_ms, as_of_ms, service)?;
    let mut services = Vec::new();
    for (name, q) in &per_service {
        let cost: Micros = line_items(plan, name, q, false)?
            .iter()
            .map(|l| l.amount_micros)
            .sum();
        let to_u64 = |v: u128, what: &str| {
            u64::try_from(v).map_err(|_| RatingError::Overflow(what.to_string()))
        };
        services.push(ServiceUsage {
            service: name.clone(),
            vcpu_seconds: money::ratio_string(q.cpu, 1_000_000, 3),
            gb_seconds: money::ratio_string(q.memory, u128::from(plan.memory_gb_bytes) * 1000, 3),
            requests: to_u64(q.requests, "requests")?,
            egress_bytes: to_u64(q.egress, "egress")?,
            egress_free_bytes: to_u64(q.egress_free, "egress")?,
            cost_micros: cost,
            cost: cost.to_string(),
        });
    }
    let total: Micros = services.iter().map(|s| s.cost_micros).sum();
    Ok(UsageReport {
        from_ms,
        to_ms,
        plan: plan.name.clone(),
        services,
        total_micros: total,
        total: total.to_string(),
    })
}

/// Estimates a workload as if all of it fell in one month (one free egress allowance).
pub fn quote(plan: &PricePlan, w: &Workload) -> Result<Quote, RatingError> {
    let ms = plan.billable_ms(w.duration_ms);
    let mem = plan.billable_memory_bytes(w.memory_bytes);
    let q = Quantities {
        cpu: u128::from(ms) * u128::from(w.cpu_millis),
        memory: u128::from(ms)
            .checked_mul(mem)
            .ok_or_else(|| RatingError::Overflow("memory".into()))?,
        requests: u128::from(w.requests),
        egress: u128::from(w.egress_bytes),
        egress_free: u128::from(w.egress_bytes).min(plan.egress_free_bytes_per_month()),
    };
    let lines = line_items(plan, "", &q, true)?;
    let total: Micros = lines.iter().map(|l| l.amount_micros).sum();
    Ok(Quote {
        plan: plan.name.clone(),
        currency: plan.currency.clone(),
        billable_ms: ms,
        billable_memory_bytes: u64::try_from(mem)
            .map_err(|_| RatingError::Overflow("memory".into()))?,
        lines,
        total_micros: total,
        total: total.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: u64 = 3_600_000;
    const GIB: u64 = 1 << 30;

    fn inst(
        id: &str,
        service: &str,
        start: u64,
        stop: Option<u64>,
        cpu: u32,
        mem: u64,
    ) -> UsageEvent {
        UsageEvent {
            id: id.into(),
            kind: UsageKind::Instance {
                service: service.into(),
                instance: format!("{id}-inst"),
                start_ms: start,
                stop_ms: stop,
                cpu_millis: cpu,
                memory_bytes: mem,
            },
        }
    }

    fn egress(id: &str, service: &str, at: u64, bytes: u64) -> UsageEvent {
        UsageEvent {
            id: id.into(),
            kind: UsageKind::Egress {
                service: service.into(),
                at_ms: at,
                bytes,
            },
        }
    }

    fn requests(id: &str, service: &str, at: u64, count: u64) -> UsageEvent {
        UsageEvent {
            id: id.into(),
            kind: UsageKind::Requests {
                service: service.into(),
                at_ms: at,
                count,
            },
        }
    }

    fn amount(lines: &[LineItem], kind: LineKind) -> u64 {
        lines
            .iter()
            .filter(|l| l.kind == kind)
            .map(|l| l.amount_micros.0)
            .sum()
    }

    #[test]
    fn worked_example_is_exactly_21_50() {
        let plan = PricePlan::default();
        for memory in [2 * GIB, 2_000_000_000] {
            let q = quote(
                &plan,
                &Workload {
                    cpu_millis: 1000,
                    memory_bytes: memory,
                    duration_ms: 100 * HOUR,
                    requests: 10_000_000,
                    egress_bytes: 0,
                },
            )
            .unwrap();
            assert_eq!(amount(&q.lines, LineKind::Cpu), 7_500_000);
            assert_eq!(
                amount(&q.lines, LineKind::Memory),
                12_000_000,
                "memory {memory}"
            );
            assert_eq!(amount(&q.lines, LineKind::Requests), 2_000_000);
            assert_eq!(q.total_micros, Micros(21_500_000));
            assert_eq!(q.total, "$21.50");
            assert_eq!(q.lines[0].quantity, "360000");
            assert_eq!(q.lines[1].quantity, "720000");
        }
    }

    #[test]
    fn usage_query_ranges() {
        let nov: Month = "2026-11".parse().unwrap();
        let q = |json: &str| serde_json::from_str::<UsageQuery>(json).unwrap();
        let now = nov.start_ms() + 5;
        assert_eq!(
            q(r#"{"month":"2026-11"}"#).range(0).unwrap(),
            (nov.start_ms(), nov.end_ms())
        );
        assert_eq!(
            q(r#"{}"#).range(now).unwrap(),
            (nov.start_ms(), nov.end_ms())
        );
        assert_eq!(
            q(r#"{"from_ms":5,"to_ms":9,"service":"s"}"#)
                .range(now)
                .unwrap(),
            (5, 9)
        );
        assert!(matches!(
            q(r#"{"from_ms":9,"to_ms":9}"#).range(now),
            Err(RatingError::EmptyRange { .. })
        ));
        assert!(
            q(r#"{"from_ms":9}"#)
                .range(now)
                .unwrap_err()
                .to_string()
                .contains("together")
        );
        assert!(
            q(r#"{"month":"2026-11","to_ms":9}"#)
                .range(now)
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
        assert!(serde_json::from_str::<UsageQuery>(r#"{"month":"2026-13"}"#).is_err());
    }

    #[test]
    fn docs_billing_usage_example() {
        // The `GET /v1/usage` example in docs/billing.md.
        let plan = PricePlan::default();
        let nov: Month = "2026-11".parse().unwrap();
        let t = nov.start_ms();
        let events = vec![
            inst("i", "hello", t, Some(t + 3_600_050), 500, 256 << 20),
            requests("r", "hello", t + 1, 12_345),
        ];
        let r = usage(&events, &plan, t, nov.end_ms(), None, nov.end_ms()).unwrap();
        let s = &r.services[0];
        assert_eq!(
            (s.vcpu_seconds.as_str(), s.gb_seconds.as_str()),
            ("1800.05", "900.025")
        );
        assert_eq!(s.cost_micros, Micros(37_501 + 15_000 + 2_469));
        assert_eq!(r.total, "$0.05497");
    }

    #[test]
    fn egress_allowance_and_price() {
        let plan = PricePlan::default();
        let q = quote(
            &plan,
            &Workload {
                egress_bytes: 150_000_000_000,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(amount(&q.lines, LineKind::Egress), 4_500_000);
        let e = q.lines.iter().find(|l| l.kind == LineKind::Egress).unwrap();
        assert_eq!(e.quantity, "150");
        assert_eq!(e.free_quantity.as_deref(), Some("100"));
        let under = quote(
            &plan,
            &Workload {
                egress_bytes: 99_000_000_000,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(under.total_micros, Micros(0));
    }

    #[test]
    fn invoice_splits_at_the_month_boundary_and_rounds_once() {
        let plan = PricePlan::default();
        let nov: Month = "2026-11".parse().unwrap();
        let dec = nov.next();
        let b = dec.start_ms();
        // 1 vCPU, 1 GiB, from 1 h before midnight to 2 h + 50 ms after it.
        let events = vec![inst(
            "a",
            "web",
            b - HOUR,
            Some(b + 2 * HOUR + 50),
            1000,
            GIB,
        )];
        let n = invoice(&events, &plan, nov, b + 3 * HOUR).unwrap();
        let d = invoice(&events, &plan, dec, b + 3 * HOUR).unwrap();
        let cpu = |inv: &Invoice| {
            inv.lines
                .iter()
                .find(|l| l.kind == LineKind::Cpu)
                .unwrap()
                .base_quantity
                .clone()
        };
        assert_eq!(cpu(&n), (1000 * HOUR).to_string());
        // December gets 2 h + 50 ms, rounded up to 2 h + 100 ms.
        assert_eq!(cpu(&d), (1000 * (2 * HOUR + 100)).to_string());
        assert_eq!(n.total_micros, Micros(75_000 + 60_000));
        assert_eq!(
            n.services,
            vec![ServiceTotal {
                service: "web".into(),
                amount_micros: Micros(135_000),
                amount: "$0.135".into()
            }]
        );
    }

    #[test]
    fn invoice_lines_per_service_and_kind() {
        let plan = PricePlan::default();
        let nov: Month = "2026-11".parse().unwrap();
        let t = nov.start_ms();
        let events = vec![
            inst("a", "web", t, Some(t + HOUR), 500, 512 << 20),
            requests("r1", "web", t + 5, 1_000_000),
            requests("r2", "api", t + 6, 500_000),
            requests("r-old", "api", t - 1, 500_000),
            egress("e1", "api", t + 7, 1),
        ];
        let inv = invoice(&events, &plan, nov, t + 2 * HOUR).unwrap();
        let kinds: Vec<(&str, LineKind)> = inv
            .lines
            .iter()
            .map(|l| (l.service.as_str(), l.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("api", LineKind::Requests),
                ("api", LineKind::Egress),
                ("web", LineKind::Cpu),
                ("web", LineKind::Memory),
                ("web", LineKind::Requests)
            ]
        );
        assert_eq!(amount(&inv.lines, LineKind::Requests), 300_000);
        assert_eq!(
            inv.total_micros.0,
            inv.services.iter().map(|s| s.amount_micros.0).sum::<u64>()
        );
        let json = serde_json::to_string(&inv).unwrap();
        assert_eq!(serde_json::from_str::<Invoice>(&json).unwrap(), inv);
    }

    #[test]
    fn duplicates_are_idempotent_and_conflicts_fail() {
        let plan = PricePlan::default();
        let nov: Month = "2026-11".parse().unwrap();
        let t = nov.start_ms();
        let once = vec![requests("r", "web", t, 1_000_000)];
        let twice = vec![
            requests("r", "web", t, 1_000_000),
            requests("r", "web", t, 1_000_000),
        ];
        assert_eq!(
            invoice(&once, &plan, nov, t).unwrap(),
            invoice(&twice, &plan, nov, t).unwrap()
        );
        let conflict = vec![requests("r", "web", t, 1), requests("r", "web", t, 2)];
        assert_eq!(
            invoice(&conflict, &plan, nov, t).unwrap_err(),
            RatingError::ConflictingEvent("r".into())
        );
        let bad = vec![inst("x", "web", 10, Some(5), 1, 1)];
        assert!(
            invoice(&bad, &plan, nov, t)
                .unwrap_err()
                .to_string()
                .contains("stop_ms 5 is before start_ms 10")
        );
        assert!(matches!(
            usage(&once, &plan, 5, 5, None, 0),
            Err(RatingError::EmptyRange { .. })
        ));
    }

    #[test]
    fn open_instances_bill_until_as_of() {
        let plan = PricePlan::default();
        let nov: Month = "2026-11".parse().unwrap();
        let t = nov.start_ms();
        let events = vec![inst("a", "web", t, None, 1000, GIB)];
        let r = usage(&events, &plan, t, nov.end_ms(), None, t + 1234).unwrap();
        assert_eq!(r.services[0].vcpu_seconds, "1.234");
        let r = usage(&events, &plan, t, nov.end_ms(), Some("other"), t + 1234).unwrap();
        assert!(r.services.is_empty());
    }

    fn egress_total(plan: &PricePlan, events: &[UsageEvent], month: Month) -> (u128, u128) {
        let q = quantities(
            events,
            plan,
            month.start_ms(),
            month.end_ms(),
            month.end_ms(),
            None,
        )
        .unwrap();
        q.values()
            .fold((0, 0), |(a, b), q| (a + q.egress, b + q.egress_free))
    }

    #[test]
    fn allowance_is_consumed_in_time_order_across_services() {
        let plan = PricePlan::default();
        let nov: Month = "2026-11".parse().unwrap();
        let t = nov.start_ms();
        let gb = 1_000_000_000;
        let events = vec![
            egress("late", "b", t + 10, 30 * gb),
            egress("early", "a", t + 1, 90 * gb),
        ];
        let q = quantities(&events, &plan, t, nov.end_ms(), t, None).unwrap();
        assert_eq!(q["a"].egress_free, 90 * u128::from(gb));
        assert_eq!(
            q["b"].egress_free,
            10 * u128::from(gb),
            "crosses the allowance: 10 GB free, 20 GB billed"
        );
        // Filtering by service still counts the other service's earlier egress.
        let only_b = quantities(&events, &plan, t, nov.end_ms(), t, Some("b")).unwrap();
        assert_eq!(only_b["b"].egress_free, 10 * u128::from(gb));
        assert!(!only_b.contains_key("a"));
        // Next month starts a fresh allowance.
        let dec = nov.next();
        let next = vec![
            egress("x", "a", t + 1, 150 * gb),
            egress("y", "a", dec.start_ms(), 50 * gb),
        ];
        assert_eq!(
            egress_total(&plan, &next, dec),
            (50 * u128::from(gb), 50 * u128::from(gb))
        );
    }

    proptest! {
        #[test]
        fn billable_time_rounds_up_to_100ms(start in 0u64..1u64 << 42, len in 0u64..10 * HOUR) {
            let plan = PricePlan::default();
            let b = plan.billable_ms(len);
            prop_assert_eq!(b % 100, 0);
            prop_assert!(b >= len && b < len + 100);
            // Over an unbounded range the instance bills exactly its rounded lifetime.
            prop_assert_eq!(instance_ms_in_range(&plan, start, Some(start + len), 0, 0, u64::MAX), b);
        }

        #[test]
        fn month_split_conserves_billable_time(
            start in 1_700_000_000_000u64..1_900_000_000_000,
            len in 0u64..200 * 24 * HOUR,
            open in any::<bool>(),
        ) {
            let plan = PricePlan::default();
            let stop = start + len;
            let mut m = Month::containing(start);
            let mut total = 0;
            while m.start_ms() <= stop {
                total += instance_ms_in_range(&plan, start, (!open).then_some(stop), stop, m.start_ms(), m.end_ms());
                m = m.next();
            }
            let expected = if open { len } else { plan.billable_ms(len) };
            prop_assert_eq!(total, expected);
        }

        #[test]
        fn monthly_invoices_add_up_to_the_whole_lifetime(
            instances in proptest::collection::vec((0u64..90 * 24 * HOUR, 0u64..70 * 24 * HOUR, 1u32..4000, 4u64 << 20..8 << 30), 1..6),
        ) {
            let plan = PricePlan::default();
            let base = "2026-10".parse::<Month>().unwrap().start_ms();
            let events: Vec<UsageEvent> = instances.iter().enumerate()
                .map(|(i, (off, len, cpu, mem))| inst(&format!("i{i}"), "svc", base + off, Some(base + off + len), *cpu, *mem))
                .collect();
            let expected_cpu: u128 = instances.iter().map(|(_, len, cpu, _)| u128::from(plan.billable_ms(*len)) * u128::from(*cpu)).sum();
            let expected_mem: u128 = instances.iter()
                .map(|(_, len, _, mem)| u128::from(plan.billable_ms(*len)) * plan.billable_memory_bytes(*mem)).sum();
            let (mut cpu, mut mem) = (0u128, 0u128);
            let mut m = Month::containing(base);
            for _ in 0..6 {
                let q = quantities(&events, &plan, m.start_ms(), m.end_ms(), u64::MAX, None).unwrap();
                if let Some(q) = q.get("svc") {
                    cpu += q.cpu;
                    mem += q.memory;
                }
                m = m.next();
            }
            prop_assert_eq!(cpu, expected_cpu);
            prop_assert_eq!(mem, expected_mem);
        }

        #[test]
        fn cost_is_monotone_in_every_quantity(
            cpu in 1u32..64_000, mem in 4u64 << 20..1 << 40, ms in 0u64..1000 * HOUR,
            req in 0u64..1 << 40, eg in 0u64..1 << 45,
            dcpu in 0u32..1000, dmem in 0u64..1 << 30, dms in 0u64..HOUR, dreq in 0u64..1000, deg in 0u64..1 << 30,
        ) {
            let plan = PricePlan::default();
            let a = Workload { cpu_millis: cpu, memory_bytes: mem, duration_ms: ms, requests: req, egress_bytes: eg };
            let b = Workload {
                cpu_millis: cpu + dcpu, memory_bytes: mem + dmem, duration_ms: ms + dms,
                requests: req + dreq, egress_bytes: eg + deg,
            };
            let (qa, qb) = (quote(&plan, &a).unwrap(), quote(&plan, &b).unwrap());
            for (la, lb) in qa.lines.iter().zip(&qb.lines) {
                prop_assert!(la.amount_micros <= lb.amount_micros, "{:?} {:?}", la, lb);
            }
            prop_assert!(qa.total_micros <= qb.total_micros);
        }

        #[test]
        fn allowance_crossed_mid_month(sizes in proptest::collection::vec(0u64..60_000_000_000, 1..20), shuffle in any::<u64>()) {
            let plan = PricePlan::default();
            let nov: Month = "2026-11".parse().unwrap();
            let t = nov.start_ms();
            let mut events: Vec<UsageEvent> = sizes.iter().enumerate()
                .map(|(i, b)| egress(&format!("e{i:02}"), if i % 2 == 0 { "a" } else { "b" }, t + i as u64 * 1000, *b))
                .collect();
            let total: u128 = sizes.iter().map(|b| u128::from(*b)).sum();
            let (all, free) = egress_total(&plan, &events, nov);
            prop_assert_eq!(all, total);
            prop_assert_eq!(free, total.min(plan.egress_free_bytes_per_month()));
            // Free bytes go to the earliest events: every event before the crossing is fully free.
            let q = quantities(&events, &plan, t, nov.end_ms(), t, None).unwrap();
            let mut before = 0u128;
            let mut per_event_free = 0u128;
            for b in &sizes {
                per_event_free += u128::from(*b).min(plan.egress_free_bytes_per_month().saturating_sub(before));
                before += u128::from(*b);
            }
            prop_assert_eq!(q.values().map(|x| x.egress_free).sum::<u128>(), per_event_free);
            // Input order does not matter: the allowance follows time order.
            let k = (shuffle as usize) % events.len();
            events.rotate_left(k);
            prop_assert_eq!(egress_total(&plan, &events, nov), (all, free));
        }
    }
}
