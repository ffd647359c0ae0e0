//! The autoscaler end to end: real containers, the real gateway and API, short windows.
//! Run as root by scripts/test.

use anyhow::{Context, Result};
use ferry_api::service::AutoscalerView;
use ferry_tests::TestCluster;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// (seconds since start, desired, ready, panicking)
type Point = (f64, u32, u32, bool);

async fn autoscaler(c: &TestCluster, name: &str) -> Result<Vec<AutoscalerView>> {
    Ok(c.http
        .get(format!("{}/v1/services/{name}/autoscaler", c.api))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// `workers` loops of `GET path` until `stop`; returns (ok, failures).
fn load(
    c: &Arc<TestCluster>,
    name: &'static str,
    path: &'static str,
    workers: usize,
    stop: Arc<AtomicBool>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    ok: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|_| {
            let (c, stop, failures, ok) = (c.clone(), stop.clone(), failures.clone(), ok.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match c.get(name, path).await {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            let m =
                                format!("{} {}", r.status(), r.text().await.unwrap_or_default());
                            failures.lock().unwrap().push(m);
                        }
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect()
}

/// A step up, a step down, then nothing: instances rise within the panic window (plus the
/// start), hold while panicking, fall after the stable window, reach zero after the grace,
/// and no request fails on the way (every scale-down drains).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn step_load_panics_up_falls_after_stable_window_and_zero_after_grace() -> Result<()> {
    let c = Arc::new(TestCluster::start().await?);
    let image = c.push_testapp("testapp", "v1").await?;
    c.deploy(
        "step",
        &json!({
            "image": image, "cpu": "0.1", "memory": "64Mi",
            "target_concurrency": 2, "max_instances": 6, "idle_grace_secs": 3,
            "autoscaling": { "stable_window_secs": 6, "anti_thrash": { "enabled": false } }
        }),
    )
    .await?;
    let trace = Arc::new(std::sync::Mutex::new(Vec::<Point>::new()));
    let t0 = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (c, trace, done) = (c.clone(), trace.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Ok(v) = autoscaler(&c, "step").await {
                    let (d, r, p) = v.iter().fold((0, 0, false), |a, x| {
                        (a.0 + x.desired, a.1 + x.ready, a.2 || x.panicking)
                    });
                    trace
                        .lock()
                        .unwrap()
                        .push((t0.elapsed().as_secs_f64(), d, r, p));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ok = Arc::new(AtomicUsize::new(0));

    // Step up: 8 in flight at target 2 asks for 4.
    let high = Arc::new(AtomicBool::new(false));
    let low = Arc::new(AtomicBool::new(false));
    let t_up = t0.elapsed().as_secs_f64();
    let mut tasks = load(
        &c,
        "step",
        "/sleep?ms=100",
        6,
        high.clone(),
        failures.clone(),
        ok.clone(),
    );
    tasks.extend(load(
        &c,
        "step",
        "/sleep?ms=100",
        2,
        low.clone(),
        failures.clone(),
        ok.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Step down to 2 in flight (one instance's worth).
    high.store(true, Ordering::Relaxed);
    let t_down = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(12)).await;
    // Nothing.
    low.store(true, Ordering::Relaxed);
    let t_stop = t0.elapsed().as_secs_f64();
    for t in tasks {
        t.await?;
    }
    let zeroed = c
        .wait_for("scale to zero", Duration::from_secs(15), || async {
            Ok(c.live_instances("step").await? == 0)
        })
        .await;
    if zeroed.is_err() {
        eprintln!("{:#?}", autoscaler(&c, "step").await?);
    }
    zeroed?;
    let t_zero = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.store(true, Ordering::Relaxed);
    sampler.await?;

    let trace = trace.lock().unwrap().clone();
    eprintln!("t_up {t_up:.1} t_down {t_down:.1} t_stop {t_stop:.1} t_zero {t_zero:.1}");
    for (t, d, r, p) in &trace {
        eprintln!(
            "{t:6.1}s desired {d} ready {r}{}",
            if *p { " panic" } else { "" }
        );
    }
    let first = |f: &dyn Fn(&Point) -> bool, after: f64| {
        trace.iter().find(|s| s.0 >= after && f(s)).map(|s| s.0)
    };
    // Up: three or more ready within the panic window (1 s bucket) plus instance starts.
    let up = first(&|s| s.2 >= 3, t_up).context("never reached 3 ready")?;
    assert!(
        up - t_up < 5.0,
        "3 ready only {:.1} s after the step",
        up - t_up
    );
    assert!(trace.iter().any(|s| s.3), "the step never panicked");
    // Down: held while panicking (no fall in the first seconds), fallen after the stable window.
    let fell = first(&|s| s.1 <= 2, t_down).context("never fell to 2")?;
    assert!(
        fell - t_down >= 2.0,
        "fell {:.1} s after the step down: inside the panic hold",
        fell - t_down
    );
    assert!(
        fell - t_down <= 6.0 + 5.0,
        "fell only {:.1} s after the step down (stable window 6 s)",
        fell - t_down
    );
    // Zero: kept through most of the 3 s grace, zero soon after it.
    let zero = first(&|s| s.1 == 0, t_stop).context("desired never 0")?;
    assert!(
        zero - t_stop >= 2.0,
        "desired 0 {:.1} s after the load stopped: inside the 3 s grace",
        zero - t_stop
    );
    assert!(
        t_zero - t_stop < 3.0 + 8.0,
        "zero {:.1} s after the load",
        t_zero - t_stop
    );
    let failures = failures.lock().unwrap().clone();
    let ok = ok.load(Ordering::Relaxed);
    assert!(ok > 200, "load too light: {ok}");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    let v = &autoscaler(&c, "step").await?[0];
    assert!(v.starts >= 4 && v.stops >= 4, "{v:?}");
    assert!(
        v.decisions.iter().any(|d| d.reason.contains("panic")),
        "{v:?}"
    );
    Arc::try_unwrap(c)
        .ok()
        .context("cluster still shared")?
        .stop()
        .await
}

/// A scale-down while long requests run on the instance it stops: the instance leaves the
/// load balancer, its requests finish (it ignores SIGTERM and has a 1 s grace, so an early
/// stop would kill them), then it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_down_waits_for_in_flight_requests() -> Result<()> {
    let c = Arc::new(TestCluster::start().await?);
    let image = c.push_testapp("testapp", "v1").await?;
    c.deploy(
        "drain",
        &json!({
            "image": image, "cpu": "0.1", "memory": "64Mi", "target_concurrency": 1,
            "min_instances": 2, "termination_grace_secs": 1,
            "env": { "TESTAPP_IGNORE_SIGTERM": "1" }
        }),
    )
    .await?;
    c.wait_for("two ready", Duration::from_secs(20), || async {
        Ok(c.service("drain").await?.revisions[0].ready_instances == 2)
    })
    .await?;
    let long = (0..2).map(|_| {
        let c = c.clone();
        tokio::spawn(async move {
            let r = c.get("drain", "/sleep?ms=5000").await?;
            anyhow::Ok((r.status().as_u16(), r.text().await?))
        })
    });
    let long: Vec<_> = long.collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Two in flight at target 1 ask for 2; max 1 takes one away under them.
    let r = c
        .http
        .put(format!("{}/v1/services/drain/scale", c.api))
        .json(&json!({ "min_instances": 0, "max_instances": 1 }))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    c.wait_for("one draining", Duration::from_secs(5), || async {
        Ok(c.instances("drain")
            .await?
            .iter()
            .any(|i| i.state == ferry_api::agent::InstanceState::Draining))
    })
    .await?;
    for h in long {
        let (status, body) = h.await??;
        assert_eq!(status, 200, "{body}");
    }
    c.wait_for(
        "the drained instance stopped",
        Duration::from_secs(10),
        || async { Ok(c.live_instances("drain").await? == 1) },
    )
    .await?;
    Arc::try_unwrap(c)
        .ok()
        .context("cluster still shared")?
        .stop()
        .await
}

/// A custom gauge the instance serves in Prometheus text scales the revision, and bad
/// autoscaling specs are 400s naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn custom_metric_scales_and_bad_specs_name_the_field() -> Result<()> {
    let c = TestCluster::start().await?;
    let image = c.push_testapp("testapp", "v1").await?;
    for (bad, field) in [
        (
            json!({ "stable_window_secs": 1 }),
            "autoscaling.stable_window_secs",
        ),
        (
            json!({ "metrics": [{ "kind": "custom", "target": 5 }] }),
            "autoscaling.metrics.path",
        ),
        (
            json!({ "metrics": [{ "kind": "cpu", "target": 500 }] }),
            "autoscaling.metrics.target",
        ),
        (
            json!({ "metrics": [{ "kind": "gpu", "target": 1 }] }),
            "gpu",
        ),
    ] {
        let (status, body) = c
            .deploy_raw("bad", &json!({ "image": image, "autoscaling": bad }))
            .await?;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["message"].as_str().unwrap_or("").contains(field),
            "{body}"
        );
    }
    let r = c
        .http
        .get(format!("{}/v1/services/nosuch/autoscaler", c.api))
        .send()
        .await?;
    assert_eq!(r.status(), 404);

    c.deploy(
        "gauge",
        &json!({
            "image": image, "cpu": "0.1", "memory": "64Mi", "min_instances": 1,
            "autoscaling": { "stable_window_secs": 6, "metrics": [
                { "kind": "custom", "target": 5, "path": "/metrics", "name": "testapp_custom_gauge" }
            ] }
        }),
    )
    .await?;
    c.wait_for("one ready", Duration::from_secs(20), || async {
        Ok(c.service("gauge").await?.revisions[0].ready_instances == 1)
    })
    .await?;
    let r = c.get("gauge", "/metrics/set?value=12").await?;
    assert_eq!(r.status(), 200);
    // 12 on one instance at 5 per instance: 3, without further requests.
    c.wait_for("three ready", Duration::from_secs(15), || async {
        Ok(c.service("gauge").await?.revisions[0].ready_instances == 3)
    })
    .await?;
    let v = &autoscaler(&c, "gauge").await?[0];
    assert_eq!(v.metrics[0].metric, "custom:testapp_custom_gauge");
    assert_eq!(v.desired, 3, "{v:?}");
    let view: Value = c
        .http
        .get(format!("{}/v1/services/gauge", c.api))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(view["autoscaler"][0]["desired"], 3, "{view}");
    c.stop().await
}
