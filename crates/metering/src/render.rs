//! Text tables and CSV for invoices, usage reports and quotes (JSON is their serde form).

use crate::rate::{Invoice, LineItem, Quote, UsageReport};
use std::fmt::Write;

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_row(out: &mut String, fields: &[&str]) {
    let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    out.push_str(&row.join(","));
    out.push_str("\r\n");
}

const LINE_HEADER: [&str; 9] = [
    "service",
    "kind",
    "quantity",
    "unit",
    "free_quantity",
    "unit_price",
    "amount",
    "amount_micros",
    "base_quantity",
];

fn line_csv(out: &mut String, l: &LineItem) {
    let micros = l.amount_micros.0.to_string();
    let amount = l.amount_micros.dollars_string();
    csv_row(
        out,
        &[
            &l.service,
            l.kind.as_str(),
            &l.quantity,
            &l.unit,
            l.free_quantity.as_deref().unwrap_or(""),
            &l.unit_price,
            &amount,
            &micros,
            &l.base_quantity,
        ],
    );
}

/// An invoice as CSV: one row per line item, then a `total` row.
pub fn invoice_csv(inv: &Invoice) -> String {
    let mut out = String::new();
    csv_row(&mut out, &LINE_HEADER);
    for l in &inv.lines {
        line_csv(&mut out, l);
    }
    let micros = inv.total_micros.0.to_string();
    csv_row(
        &mut out,
        &[
            "",
            "total",
            "",
            "",
            "",
            "",
            &inv.total_micros.dollars_string(),
            &micros,
            "",
        ],
    );
    out
}

/// A usage report as CSV: one row per service.
pub fn usage_csv(r: &UsageReport) -> String {
    let mut out = String::new();
    csv_row(
        &mut out,
        &[
            "service",
            "vcpu_seconds",
            "gb_seconds",
            "requests",
            "egress_bytes",
            "egress_free_bytes",
            "cost",
            "cost_micros",
        ],
    );
    for s in &r.services {
        csv_row(
            &mut out,
            &[
                &s.service,
                &s.vcpu_seconds,
                &s.gb_seconds,
                &s.requests.to_string(),
                &s.egress_bytes.to_string(),
                &s.egress_free_bytes.to_string(),
                &s.cost_micros.dollars_string(),
                &s.cost_micros.0.to_string(),
            ],
        );
    }
    out
}

/// Renders rows as a left-aligned table with the last column right-aligned.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == cols {
                let _ = write!(line, "{cell:>w$}", w = widths[c]);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn line_rows(lines: &[LineItem], with_service: bool) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut header = Vec::new();
    if with_service {
        header.push("SERVICE".to_string());
    }
    header.extend(["ITEM", "QUANTITY", "PRICE", "AMOUNT"].map(String::from));
    rows.push(header);
    for l in lines {
        let mut r = Vec::new();
        if with_service {
            r.push(l.service.clone());
        }
        let quantity = match &l.free_quantity {
            Some(free) if free != "0" => format!("{} {} ({free} free)", l.quantity, l.unit),
            _ => format!("{} {}", l.quantity, l.unit),
        };
        r.extend([
            l.kind.as_str().to_string(),
            quantity,
            l.unit_price.clone(),
            l.amount.clone(),
        ]);
        rows.push(r);
    }
    rows
}

fn total_row(with_service: bool, total: &str) -> Vec<String> {
    let mut r = vec![String::new(); if with_service { 4 } else { 3 }];
    r[0] = "TOTAL".into();
    r.push(total.to_string());
    r
}

pub fn quote_text(q: &Quote) -> String {
    let mut rows = line_rows(&q.lines, false);
    rows.push(total_row(false, &q.total));
    format!("plan: {} ({})\n{}", q.plan, q.currency, table(&rows))
}

pub fn invoice_text(inv: &Invoice) -> String {
    let mut rows = line_rows(&inv.lines, true);
    rows.push(total_row(true, &inv.total));
    let mut out = format!(
        "invoice {} (plan {}, {})\n",
        inv.month, inv.plan, inv.currency
    );
    if inv.lines.is_empty() {
        out.push_str("no usage\n");
    }
    out.push_str(&table(&rows));
    out
}

pub fn usage_text(r: &UsageReport) -> String {
    let mut rows = vec![
        [
            "SERVICE",
            "VCPU-SECONDS",
            "GB-SECONDS",
            "REQUESTS",
            "EGRESS-BYTES",
            "COST",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for s in &r.services {
        rows.push(vec![
            s.service.clone(),
            s.vcpu_seconds.clone(),
            s.gb_seconds.clone(),
            s.requests.to_string(),
            s.egress_bytes.to_string(),
            s.cost.clone(),
        ]);
    }
    rows.push(vec![
        "TOTAL".into(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        r.total.clone(),
    ]);
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Month, UsageEvent, UsageKind};
    use crate::plan::PricePlan;
    use crate::rate::{Workload, invoice, quote, usage};

    fn sample() -> (Vec<UsageEvent>, Month) {
        let m: Month = "2026-11".parse().unwrap();
        let t = m.start_ms();
        let events = vec![
            UsageEvent {
                id: "i".into(),
                kind: UsageKind::Instance {
                    service: "web,x".into(),
                    instance: "i1".into(),
                    start_ms: t,
                    stop_ms: Some(t + 3_600_000),
                    cpu_millis: 1000,
                    memory_bytes: 1 << 30,
                },
            },
            UsageEvent {
                id: "r".into(),
                kind: UsageKind::Requests {
                    service: "api".into(),
                    at_ms: t,
                    count: 2_000_000,
                },
            },
        ];
        (events, m)
    }

    #[test]
    fn invoice_csv_quotes_and_totals() {
        let (events, m) = sample();
        let inv = invoice(&events, &PricePlan::default(), m, m.end_ms()).unwrap();
        let csv = invoice_csv(&inv);
        let rows: Vec<&str> = csv.split("\r\n").filter(|r| !r.is_empty()).collect();
        assert_eq!(
            rows[0],
            "service,kind,quantity,unit,free_quantity,unit_price,amount,amount_micros,base_quantity"
        );
        assert_eq!(
            rows[1],
            "api,requests,2000000,requests,,$0.20 per million requests,0.40,400000,2000000"
        );
        assert!(
            rows[2].starts_with("\"web,x\",cpu,3600,vCPU-second,"),
            "{}",
            rows[2]
        );
        assert_eq!(rows.last().unwrap(), &",total,,,,,0.535,535000,");
    }

    #[test]
    fn text_renderings_show_lines_and_total() {
        let (events, m) = sample();
        let plan = PricePlan::default();
        let inv = invoice(&events, &plan, m, m.end_ms()).unwrap();
        let text = invoice_text(&inv);
        assert!(
            text.starts_with("invoice 2026-11 (plan default, USD)\n"),
            "{text}"
        );
        assert!(
            text.lines().last().unwrap().starts_with("TOTAL")
                && text.trim_end().ends_with("$0.535"),
            "{text}"
        );
        let r = usage(&events, &plan, m.start_ms(), m.end_ms(), None, m.end_ms()).unwrap();
        let u = usage_text(&r);
        assert!(u.contains("web,x") && u.contains("3600"), "{u}");
        assert_eq!(usage_csv(&r).lines().count(), 3);
        let q = quote(
            &plan,
            &Workload {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                duration_ms: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let t = quote_text(&q);
        assert!(
            t.contains("cpu") && t.contains("egress") && t.contains("TOTAL"),
            "{t}"
        );
    }
}
