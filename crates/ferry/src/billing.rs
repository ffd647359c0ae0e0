//! Billing verbs: `ferry price` (local estimate under a price plan), and `ferry usage` /
//! `ferry invoice`, which fetch rated usage from the control plane (`$FERRY_API`) and render it.
//! All rating lives in ferry-metering; the JSON shapes are in docs/billing.md.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ferry_api::{Cpu, Memory};
use ferry_metering::{
    Invoice, Month, PricePlan, UsageReport, Workload, input, parse_instant_ms, quote, render,
};
use std::path::PathBuf;

pub const DEFAULT_API: &str = "http://127.0.0.1:7070";

#[derive(Subcommand)]
pub enum BillingCommand {
    /// Estimate what a workload costs: one instance running for --hours.
    Price(PriceArgs),
    /// Show metered usage per service (GB-seconds, vCPU-seconds, requests, egress, cost).
    Usage(UsageArgs),
    /// Show a month's invoice: line items per service and kind, and the total.
    Invoice(InvoiceArgs),
}

#[derive(Args)]
pub struct PriceArgs {
    /// vCPUs, as cores ("1", "0.5") or millicores ("500m")
    #[arg(long, default_value = "1")]
    pub cpu: Cpu,
    /// Memory, binary ("2Gi") or decimal ("2G") units; billed rounded up to the plan's increment
    #[arg(long, default_value = "512Mi")]
    pub memory: Memory,
    /// Hours of running time (decimals allowed); 730 is a month
    #[arg(long, default_value = "730")]
    pub hours: String,
    /// Requests served, with an optional k/M/B suffix ("10M")
    #[arg(long, default_value = "0")]
    pub requests: String,
    /// Egress bytes, with a unit ("150GB" = 150×10^9, "150GiB" = 150×2^30)
    #[arg(long, default_value = "0")]
    pub egress: String,
    /// TOML price-plan file (default: the built-in plan, see docs/billing.md)
    #[arg(long, env = "FERRY_PRICE_PLAN")]
    pub plan: Option<PathBuf>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Output format of `usage` and `invoice`.
#[derive(Args, Clone, Copy)]
pub struct Format {
    /// Print JSON
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV
    #[arg(long)]
    pub csv: bool,
}

#[derive(Args)]
pub struct UsageArgs {
    /// Only this service
    #[arg(long)]
    pub service: Option<String>,
    /// Calendar month (UTC), YYYY-MM [default: the current month, chosen by the server]
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub month: Option<Month>,
    /// Start of the range: YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or Unix ms
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// End of the range (exclusive), same forms as --from
    #[arg(long, requires = "from")]
    pub to: Option<String>,
    #[command(flatten)]
    pub format: Format,
    /// Control-plane API base URL
    #[arg(long, env = "FERRY_API", default_value = DEFAULT_API)]
    pub api: String,
}

#[derive(Args)]
pub struct InvoiceArgs {
    /// Calendar month (UTC), YYYY-MM
    #[arg(long)]
    pub month: Month,
    #[command(flatten)]
    pub format: Format,
    /// Control-plane API base URL
    #[arg(long, env = "FERRY_API", default_value = DEFAULT_API)]
    pub api: String,
}

pub async fn run(cmd: BillingCommand) -> anyhow::Result<()> {
    match cmd {
        BillingCommand::Price(args) => {
            print!("{}", price(&args)?);
            Ok(())
        }
        BillingCommand::Usage(args) => {
            let query = usage_query(&args)?;
            let report: UsageReport = get_json(&args.api, &format!("/v1/usage{query}")).await?;
            print!("{}", render_usage(&report, args.format)?);
            Ok(())
        }
        BillingCommand::Invoice(args) => {
            let inv: Invoice = get_json(&args.api, &format!("/v1/invoices/{}", args.month)).await?;
            print!("{}", render_invoice(&inv, args.format)?);
            Ok(())
        }
    }
}

/// Renders the estimate of `ferry price`.
pub fn price(args: &PriceArgs) -> anyhow::Result<String> {
    let plan = match &args.plan {
        None => PricePlan::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading price plan {}", path.display()))?;
            PricePlan::from_toml(&text).with_context(|| format!("price plan {}", path.display()))?
        }
    };
    let workload = Workload {
        cpu_millis: args.cpu.millis(),
        memory_bytes: args.memory.bytes(),
        duration_ms: parse_hours_ms(&args.hours)?,
        requests: parse_count(&args.requests)?,
        egress_bytes: parse_bytes(&args.egress)?,
    };
    let q = quote(&plan, &workload)?;
    if args.json {
        Ok(serde_json::to_string_pretty(&q)? + "\n")
    } else {
        use ferry_metering::money::ratio_string;
        let hours = ratio_string(u128::from(q.billable_ms), 3_600_000, 6);
        let gib = |b: u64| ratio_string(u128::from(b), 1 << 30, 3);
        Ok(format!(
            "{} vCPU, {} GiB memory (billed as {} GiB), {hours} hours\n{}",
            args.cpu,
            gib(args.memory.bytes()),
            gib(q.billable_memory_bytes),
            render::quote_text(&q)
        ))
    }
}

fn render_usage(r: &UsageReport, f: Format) -> anyhow::Result<String> {
    Ok(if f.json {
        serde_json::to_string_pretty(r)? + "\n"
    } else if f.csv {
        render::usage_csv(r)
    } else {
        render::usage_text(r)
    })
}

fn render_invoice(inv: &Invoice, f: Format) -> anyhow::Result<String> {
    Ok(if f.json {
        serde_json::to_string_pretty(inv)? + "\n"
    } else if f.csv {
        render::invoice_csv(inv)
    } else {
        render::invoice_text(inv)
    })
}

/// The query string of `GET /v1/usage`: `service`, and `month` or `from_ms`+`to_ms`.
fn usage_query(args: &UsageArgs) -> anyhow::Result<String> {
    let mut q: Vec<String> = Vec::new();
    if let Some(s) = &args.service {
        ferry_api::name::validate_service_name(s).with_context(|| format!("--service {s:?}"))?;
        q.push(format!("service={s}"));
    }
    if let Some(m) = args.month {
        q.push(format!("month={m}"));
    }
    if let (Some(from), Some(to)) = (&args.from, &args.to) {
        let from_ms = parse_instant_ms(from).context("--from")?;
        let to_ms = parse_instant_ms(to).context("--to")?;
        if to_ms <= from_ms {
            bail!("--to {to:?} must be after --from {from:?}");
        }
        q.push(format!("from_ms={from_ms}"));
        q.push(format!("to_ms={to_ms}"));
    }
    Ok(if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    })
}

async fn get_json<T: serde::de::DeserializeOwned>(api: &str, path: &str) -> anyhow::Result<T> {
    let url = format!("{}{path}", api.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .get(&url)
        .send()
        .await
        .with_context(|| {
            format!(
                "cannot reach the control plane at {url} (is `ferry server` running? set FERRY_API)"
            )
        })?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("message")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
        bail!("GET {url}: {status}: {message}");
    }
    serde_json::from_slice(&body).with_context(|| format!("GET {url}: unexpected answer"))
}

/// `--hours` → milliseconds (see [`ferry_metering::input`]).
pub fn parse_hours_ms(s: &str) -> anyhow::Result<u64> {
    input::parse_hours_ms(s).map_err(|e| anyhow::anyhow!("--{e}"))
}

/// `--requests` → a count.
pub fn parse_count(s: &str) -> anyhow::Result<u64> {
    input::parse_count(s).map_err(|e| anyhow::anyhow!("--{e}"))
}

/// `--egress` → bytes.
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    input::parse_bytes(s).map_err(|e| anyhow::anyhow!("--{e}"))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_flag() {
        assert!(
            parse_hours_ms("forever")
                .unwrap_err()
                .to_string()
                .starts_with("--hours")
        );
        assert!(
            parse_count("10Q")
                .unwrap_err()
                .to_string()
                .starts_with("--requests")
        );
        assert!(
            parse_bytes("3PB")
                .unwrap_err()
                .to_string()
                .starts_with("--egress")
        );
        assert_eq!(parse_count("10M").unwrap(), 10_000_000);
    }
}
