//! Billing verbs: `ferry price` (local estimate under a price plan), and `ferry usage` /
//! `ferry invoice`, which fetch rated usage from the control plane (`$FERRY_API`) and render it.
//! All rating lives in ferry-metering; the JSON shapes are in docs/billing.md.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ferry_api::{Cpu, Memory};
use ferry_metering::{
    Invoice, Month, PricePlan, UsageReport, Workload, parse_instant_ms, quote, render,
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

/// `--hours` → milliseconds, rounded up to a whole millisecond.
pub fn parse_hours_ms(s: &str) -> anyhow::Result<u64> {
    let (digits, scale) = decimal(s.trim())
        .with_context(|| format!("--hours {s:?}: expected a number like \"100\" or \"0.5\""))?;
    let ms = (digits * 3_600_000).div_ceil(10u128.pow(scale));
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms <= 100 * 365 * 24 * 3_600_000)
        .with_context(|| format!("--hours {s:?}: too large"))
}

fn scaled(s: &str, flag: &str, number: &str, mult: u128) -> anyhow::Result<u64> {
    let (digits, scale) =
        decimal(number).with_context(|| format!("{flag} {s:?}: expected a number"))?;
    let value = digits * mult;
    let den = 10u128.pow(scale);
    if !value.is_multiple_of(den) {
        bail!("{flag} {s:?}: not a whole number");
    }
    u64::try_from(value / den).with_context(|| format!("{flag} {s:?}: too large"))
}

/// `--requests` → a count: "10M", "2.5k", "1B", "1200".
pub fn parse_count(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (number, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1_000),
        Some((i, 'M')) => (&t[..i], 1_000_000),
        Some((i, 'B' | 'G')) => (&t[..i], 1_000_000_000),
        _ => (t, 1),
    };
    scaled(s, "--requests", number, mult)
}

/// `--egress` → bytes: decimal units (B, KB, MB, GB, TB; also k, M, G, T) or binary units
/// (KiB, MiB, GiB, TiB; also Ki, Mi, Gi, Ti).
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
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
        other => bail!(
            "--egress {s:?}: unknown unit {other:?} (use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)"
        ),
    };
    scaled(s, "--egress", number, mult)
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
                    .contains("--hours"),
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
        assert!(e.contains("--egress") && e.contains("PB"), "{e}");
        assert!(parse_bytes("GB").is_err());
    }
}
