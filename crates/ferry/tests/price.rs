//! `ferry price`, `ferry usage` and `ferry invoice` through the real binary. usage/invoice talk
//! to a small HTTP server in this test that answers what the control plane will serve.

use anyhow::{Context, Result};
use ferry_metering::{Month, PricePlan, UsageEvent, UsageKind, invoice, render, usage};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Output};

fn ferry(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(args)
        .env_remove("FERRY_PRICE_PLAN")
        .env_remove("FERRY_API");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().context("running ferry")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn line_with<'a>(text: &'a str, start: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no line starting {start:?} in\n{text}"))
}

#[test]
fn worked_example_costs_21_50_with_either_gb() -> Result<()> {
    for memory in ["2Gi", "2G"] {
        let o = ferry(
            &[
                "price",
                "--cpu",
                "1",
                "--memory",
                memory,
                "--hours",
                "100",
                "--requests",
                "10M",
            ],
            &[],
        )?;
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        assert!(line_with(&out, "cpu").ends_with("$7.50"), "{out}");
        assert!(line_with(&out, "memory").ends_with("$12.00"), "{out}");
        assert!(line_with(&out, "requests").ends_with("$2.00"), "{out}");
        assert!(line_with(&out, "egress").ends_with("$0.00"), "{out}");
        assert!(line_with(&out, "TOTAL").ends_with("$21.50"), "{out}");
    }
    Ok(())
}

#[test]
fn json_and_egress() -> Result<()> {
    let o = ferry(
        &[
            "price",
            "--cpu",
            "1",
            "--memory",
            "2Gi",
            "--hours",
            "100",
            "--requests",
            "10M",
            "--egress",
            "150GB",
            "--json",
        ],
        &[],
    )?;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["total_micros"], 26_000_000, "21.50 + 50 GB × $0.09");
    assert_eq!(v["total"], "$26.00");
    assert_eq!(v["billable_ms"], 360_000_000);
    let egress = v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "egress")
        .unwrap();
    assert_eq!(egress["free_quantity"], "100");
    assert_eq!(egress["amount_micros"], 4_500_000);
    Ok(())
}

#[test]
fn plan_file_replaces_prices() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let plan = dir.path().join("plan.toml");
    std::fs::write(
        &plan,
        "name = \"cheap\"\ncpu_price = \"0.01\"\nrequest_price = \"0\"\n",
    )?;
    let p = plan.to_str().unwrap();
    let o = ferry(
        &[
            "price",
            "--memory",
            "1Gi",
            "--hours",
            "10",
            "--requests",
            "1M",
            "--plan",
            p,
        ],
        &[],
    )?;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("plan: cheap"), "{out}");
    assert!(line_with(&out, "cpu").ends_with("$0.10"), "{out}");
    assert!(line_with(&out, "memory").ends_with("$0.60"), "{out}");
    assert!(line_with(&out, "TOTAL").ends_with("$0.70"), "{out}");
    // The same through the environment.
    let o = ferry(
        &["price", "--memory", "1Gi", "--hours", "10", "--json"],
        &[("FERRY_PRICE_PLAN", p)],
    )?;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&o.stdout)?["plan"],
        "cheap"
    );

    std::fs::write(&plan, "cpu_price = 0.01\n")?;
    let o = ferry(&["price", "--plan", p], &[])?;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cpu_price"), "{}", stderr(&o));
    Ok(())
}

#[test]
fn bad_flags_are_named() -> Result<()> {
    for (args, needle) in [
        (vec!["price", "--memory", "2X"], "2X"),
        (vec!["price", "--cpu", "lots"], "lots"),
        (vec!["price", "--hours", "forever"], "--hours"),
        (vec!["price", "--requests", "10Q"], "--requests"),
        (vec!["price", "--egress", "5PB"], "--egress"),
        (
            vec!["price", "--plan", "/nonexistent/plan.toml"],
            "/nonexistent/plan.toml",
        ),
        (vec!["invoice", "--month", "2026-13"], "2026-13"),
        (
            vec!["usage", "--from", "2026-11-02", "--to", "2026-11-01"],
            "--to",
        ),
    ] {
        let o = ferry(&args, &[])?;
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    Ok(())
}

/// Serves `responses` in order, one connection each, and returns the request lines it saw.
fn serve(responses: Vec<(u16, String)>) -> Result<(String, std::thread::JoinHandle<Vec<String>>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for (status, body) in responses {
            let Ok((mut stream, _)) = listener.accept() else {
                break;
            };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
            }
            seen.push(request_line.trim().to_string());
            let resp = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(resp.as_bytes()).unwrap();
        }
        seen
    });
    Ok((base, handle))
}

fn sample_events(m: Month) -> Vec<UsageEvent> {
    let t = m.start_ms();
    vec![
        UsageEvent {
            id: "i1".into(),
            kind: UsageKind::Instance {
                service: "hello".into(),
                instance: "hello-1".into(),
                start_ms: t,
                stop_ms: Some(t + 3_600_050),
                cpu_millis: 500,
                memory_bytes: 256 << 20,
            },
        },
        UsageEvent {
            id: "r1".into(),
            kind: UsageKind::Requests {
                service: "hello".into(),
                at_ms: t + 1,
                count: 12_345,
            },
        },
    ]
}

#[test]
fn invoice_and_usage_render_what_the_api_serves() -> Result<()> {
    let m: Month = "2026-11".parse()?;
    let plan = PricePlan::default();
    let inv = invoice(&sample_events(m), &plan, m, m.end_ms())?;
    let rep = usage(
        &sample_events(m),
        &plan,
        m.start_ms(),
        m.end_ms(),
        Some("hello"),
        m.end_ms(),
    )?;
    let (base, server) = serve(vec![
        (200, serde_json::to_string(&inv)?),
        (200, serde_json::to_string(&inv)?),
        (200, serde_json::to_string(&rep)?),
        (200, serde_json::to_string(&rep)?),
        (
            404,
            r#"{"code":"not_found","message":"no invoice for 1999-01","request_id":"r"}"#.into(),
        ),
    ])?;
    let env = [("FERRY_API", base.as_str())];

    let o = ferry(&["invoice", "--month", "2026-11", "--csv"], &env)?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), render::invoice_csv(&inv));

    let o = ferry(&["invoice", "--month", "2026-11"], &env)?;
    assert_eq!(stdout(&o), render::invoice_text(&inv));
    assert!(stdout(&o).contains("hello"));

    let o = ferry(
        &[
            "usage",
            "--service",
            "hello",
            "--month",
            "2026-11",
            "--json",
        ],
        &env,
    )?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        serde_json::from_slice::<ferry_metering::UsageReport>(&o.stdout)?,
        rep
    );

    let o = ferry(
        &[
            "usage",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-02T12:00:00Z",
            "--csv",
        ],
        &env,
    )?;
    assert_eq!(stdout(&o), render::usage_csv(&rep));

    let o = ferry(&["invoice", "--month", "1999-01"], &env)?;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("404") && stderr(&o).contains("no invoice for 1999-01"),
        "{}",
        stderr(&o)
    );

    let seen = server.join().unwrap();
    assert_eq!(
        seen,
        vec![
            "GET /v1/invoices/2026-11 HTTP/1.1",
            "GET /v1/invoices/2026-11 HTTP/1.1",
            "GET /v1/usage?service=hello&month=2026-11 HTTP/1.1",
            "GET /v1/usage?from_ms=1793491200000&to_ms=1793620800000 HTTP/1.1",
            "GET /v1/invoices/1999-01 HTTP/1.1",
        ]
    );
    Ok(())
}

#[test]
fn unreachable_api_is_a_clear_error() -> Result<()> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let api = format!("http://127.0.0.1:{port}");
    let o = ferry(&["invoice", "--month", "2026-11"], &[("FERRY_API", &api)])?;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cannot reach the control plane"),
        "{}",
        stderr(&o)
    );
    Ok(())
}

/// `ferry server --price-plan` with a broken plan stops at start, naming the file.
#[test]
fn server_refuses_a_bad_price_plan() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, "cpu_per_vcpu_second = \"lots\"\n")?;
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "server",
            "--api-addr",
            "127.0.0.1:0",
            "--gateway-addr",
            "127.0.0.1:0",
            "--registry-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--bridge",
            "fplan0",
            "--subnet",
            "10.94.0.1/24",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--price-plan")
        .arg(&plan)
        .env("FERRY_LOG", "error")
        .output()?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("plan.toml"), "{err}");
    Ok(())
}
