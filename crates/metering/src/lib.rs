//! ferry-metering: pure rating. Usage events (instance lifetimes × CPU and memory allocation,
//! requests, egress) → billable quantities (100 ms time increments, rounded-up memory) →
//! priced line items → monthly invoices, usage reports and quotes, rendered as text, CSV or
//! JSON (serde).
//!
//! Owns: the price plan (default and TOML file), exact money arithmetic (prices in pico-dollars,
//! amounts in micro-dollars, one half-up rounding per line item, no floats), month boundaries
//! (UTC), the free egress allowance. Must not: do I/O, read clocks (callers pass `as_of_ms`),
//! or know how events are stored; control stores the events and serves the results.
//!
//! Entry points: [`PricePlan::default`] / [`PricePlan::from_toml`], [`invoice`], [`usage`],
//! [`quote`], and the renderers in [`render`]. The rules and the JSON shapes are in
//! docs/billing.md.

pub mod event;
pub mod input;
pub mod money;
pub mod plan;
pub mod rate;
pub mod render;

pub use event::{Month, MonthError, UsageEvent, UsageKind, parse_instant_ms};
pub use money::{Micros, MoneyError};
pub use plan::{PerTime, PlanError, PricePlan, Rate};
pub use rate::{
    Invoice, LineItem, LineKind, Quantities, Quote, RatingError, ServiceTotal, ServiceUsage,
    UsageQuery, UsageReport, Workload, dedupe, invoice, line_items, quantities, quote, usage,
};
