//! Metering end to end: real instances and requests through the gateway become usage events in
//! control's database, rated by `/v1/usage` and `/v1/invoices/{month}` (docs/billing.md).
//! Run as root by scripts/test.

use anyhow::{Context, Result, ensure};
use ferry_tests::{TestCluster, now_ms};
use serde_json::{Value, json};
use std::time::Duration;

async fn api(c: &TestCluster, path: &str) -> Result<Value> {
    let r = c.http.get(format!("{}{path}", c.api)).send().await?;
    let status = r.status();
    let body: Value = r.json().await?;
    ensure!(status.is_success(), "GET {path}: {status}: {body}");
    Ok(body)
}

/// `(id, start_ms, stop_ms, cpu_millis)` of the service's instance events.
async fn instance_events(
    c: &TestCluster,
    service: &str,
) -> Result<Vec<(String, u64, Option<u64>, u64)>> {
    let ev = api(c, &format!("/v1/usage/events?service={service}")).await?;
    Ok(ev
        .as_array()
        .context("events array")?
        .iter()
        .filter(|e| e["kind"] == "instance")
        .map(|e| {
            (
                e["id"].as_str().unwrap_or_default().to_string(),
                e["start_ms"].as_u64().unwrap_or(0),
                e["stop_ms"].as_u64(),
                e["cpu_millis"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

fn service_usage(report: &Value, service: &str) -> Value {
    report["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == service).cloned())
        .unwrap_or(Value::Null)
}

fn num(v: &Value) -> f64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_and_instance_time_are_metered_and_invoiced() -> Result<()> {
    const N: u64 = 25;
    let c = TestCluster::start().await?;
    let image = c.push_testapp("testapp", "v1").await?;
    c.deploy(
        "meter",
        &json!({ "image": image, "cpu": "0.5", "memory": "128Mi", "idle_grace_secs": 2 }),
    )
    .await?;
    let before_first = now_ms();
    let mut first_answered = 0;
    let mut bytes = 0u64;
    for i in 0..N {
        let r = c.get("meter", "/env").await?;
        ensure!(r.status() == 200, "request {i}: {}", r.status());
        bytes += r.bytes().await?.len() as u64;
        if i == 0 {
            first_answered = now_ms();
        }
    }
    let last_answered = now_ms();

    // The gateway reports each second; wait for the last window to land.
    c.wait_for("N requests metered", Duration::from_secs(10), || async {
        let report = api(&c, "/v1/usage?service=meter").await?;
        let got = service_usage(&report, "meter")["requests"]
            .as_u64()
            .unwrap_or(0);
        ensure!(got <= N, "metered {got} requests, sent {N}");
        Ok(got == N)
    })
    .await?;
    let report = api(&c, "/v1/usage?service=meter").await?;
    let egress = service_usage(&report, "meter")["egress_bytes"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        egress >= bytes,
        "egress {egress} bytes: at least the {bytes} body bytes the client read"
    );

    // Idle for the grace: scaled to zero, the agent reports the stop, the event closes.
    c.wait_for("instance usage closed", Duration::from_secs(30), || async {
        let events = instance_events(&c, "meter").await?;
        Ok(!events.is_empty() && events.iter().all(|e| e.2.is_some()))
    })
    .await?;
    let closed_seen = now_ms();
    let events = instance_events(&c, "meter").await?;
    ensure!(c.live_instances("meter").await? == 0);

    let views = c.instances("meter").await?;
    let mut lifetime_ms = 0u64;
    let mut billed_ms = 0u64;
    for (id, start, stop, cpu) in &events {
        let stop = stop.expect("closed");
        ensure!(*cpu == 500, "{id}: cpu {cpu}");
        // The agent's start lies between the first request and its answer (cold start), and
        // after control placed the instance; its stop after the last answer and before we saw it.
        ensure!(
            before_first <= *start && *start <= first_answered,
            "{id}: start {start} outside [{before_first}, {first_answered}]"
        );
        if let Some(v) = views.iter().find(|v| format!("inst-{}", v.id) == *id) {
            ensure!(
                v.started_ms <= *start,
                "{id}: placed {} after start {start}",
                v.started_ms
            );
        }
        ensure!(
            last_answered < stop && stop <= closed_seen,
            "{id}: stop {stop} outside ({last_answered}, {closed_seen}]"
        );
        lifetime_ms += stop - start;
        billed_ms += (stop - start).div_ceil(100) * 100;
    }
    let n_inst = events.len() as f64;
    eprintln!(
        "instances {}, lifetime {lifetime_ms} ms, billed {billed_ms} ms",
        events.len()
    );

    let report = api(&c, "/v1/usage?service=meter").await?;
    let u = service_usage(&report, "meter");
    assert_eq!(u["requests"], N, "{report}");
    let vcpu_s = num(&u["vcpu_seconds"]);
    let exact = billed_ms as f64 * 0.5 / 1000.0;
    assert!(
        (vcpu_s - exact).abs() < 1e-9,
        "vcpu_seconds {vcpu_s} == billed {billed_ms} ms × 0.5"
    );
    let raw = lifetime_ms as f64 * 0.5 / 1000.0;
    assert!(
        vcpu_s >= raw && vcpu_s - raw <= n_inst * 0.1 * 0.5 + 1e-9,
        "vcpu_seconds {vcpu_s} ≈ lifetime × cpu {raw} (within 100 ms per instance)"
    );
    // 128Mi bills as the 256 MiB increment: a quarter GB.
    let gb_s = num(&u["gb_seconds"]);
    assert!(
        (gb_s - billed_ms as f64 * 0.25 / 1000.0).abs() < 1e-3,
        "gb_seconds {gb_s}"
    );

    // The month's invoice carries the same quantities and cost.
    let month = report_month(&report)?;
    let inv = api(&c, &format!("/v1/invoices/{month}")).await?;
    let lines: Vec<&Value> = inv["lines"]
        .as_array()
        .context("lines")?
        .iter()
        .filter(|l| l["service"] == "meter")
        .collect();
    let kinds: Vec<&str> = lines.iter().filter_map(|l| l["kind"].as_str()).collect();
    assert_eq!(kinds, ["cpu", "memory", "requests", "egress"], "{inv}");
    assert_eq!(lines[0]["base_quantity"], (billed_ms * 500).to_string());
    assert_eq!(lines[2]["base_quantity"], N.to_string());
    let sub = inv["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == "meter"))
        .context("meter subtotal")?;
    assert_eq!(sub["amount_micros"], u["cost_micros"], "{inv}");

    // Errors keep the API's envelope.
    let r = c
        .http
        .get(format!("{}/v1/invoices/2026-13", c.api))
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await?;
    assert_eq!(body["code"], "invalid_month");
    assert!(body["request_id"].is_string());
    c.stop().await
}

fn report_month(report: &Value) -> Result<String> {
    let from = report["from_ms"].as_u64().context("from_ms")?;
    Ok(ferry_metering::Month::containing(from).to_string())
}

/// The server stops while an instance runs and starts again on the same database: the
/// instance's usage is closed near the stop (by the agent's last report, or at start by
/// control from `last_seen_ms` when that report was lost; the crash path is unit-tested in
/// ferry-control), never left open, and the new run's instance is a new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_leaves_no_instance_usage_open() -> Result<()> {
    let c = TestCluster::start().await?;
    let image = c.push_testapp("testapp", "v1").await?;
    c.deploy(
        "keep",
        &json!({ "image": image, "cpu": "0.25", "memory": "64Mi", "min_instances": 1 }),
    )
    .await?;
    c.wait_for(
        "an open instance event",
        Duration::from_secs(30),
        || async {
            Ok(instance_events(&c, "keep")
                .await?
                .iter()
                .any(|e| e.2.is_none()))
        },
    )
    .await?;
    // Let the agent's resource samples refresh last_seen a few times.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_stop = now_ms();
    let c = c.restart().await?;
    let after_restart = now_ms();
    let events = instance_events(&c, "keep").await?;
    let old: Vec<_> = events.iter().filter(|e| e.1 < before_stop).collect();
    ensure!(
        !old.is_empty(),
        "the first run's instance event: {events:?}"
    );
    for (id, start, stop, _) in old {
        let stop = stop.context(format!("{id} left open after a restart"))?;
        eprintln!(
            "{id}: started {start}, closed at {stop}: {} ms before the stop was asked, {} ms lifetime",
            before_stop as i64 - stop as i64,
            stop - start
        );
        ensure!(
            stop + 2_500 >= before_stop && stop <= after_restart,
            "{id}: closed at {stop}, the server stopped at {before_stop}: last seen within the sampling period"
        );
        ensure!(stop > *start + 2_000, "{id}: closed after its start");
    }
    c.wait_for(
        "the new run's instance event",
        Duration::from_secs(30),
        || async {
            Ok(instance_events(&c, "keep")
                .await?
                .iter()
                .any(|e| e.1 >= after_restart - 1_000 && e.2.is_none()))
        },
    )
    .await?;
    c.stop().await
}
