//! End-to-end scenarios through `ferry server` (in-process), real containers, the real API,
//! registry and gateway. Run as root by scripts/test.

use anyhow::{Context, Result};
use ferry_tests::TestCluster;
use serde_json::{Value, json};
use std::time::Duration;

async fn cluster_with_app(name: &str, extra: Value) -> Result<(TestCluster, String)> {
    let c = TestCluster::start().await?;
    let image = c.push_testapp("testapp", "v1").await?;
    let mut spec = json!({ "image": image, "cpu": "0.5", "memory": "128Mi" });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    c.deploy(name, &spec).await?;
    Ok((c, image))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_start_then_warm_then_scale_to_zero_and_back() -> Result<()> {
    let (c, _) = cluster_with_app("hello", json!({ "idle_grace_secs": 2 })).await?;
    assert_eq!(
        c.live_instances("hello").await?,
        0,
        "min 0: nothing runs before the first request"
    );
    let r = c.get("hello", "/env").await?;
    assert_eq!(r.status(), 200);
    let first: Value = r.json().await?;
    assert_eq!(
        c.live_instances("hello").await?,
        1,
        "the first request cold-started one instance"
    );
    let second: Value = c.get("hello", "/env").await?.json().await?;
    assert_eq!(
        first["HOSTNAME"], second["HOSTNAME"],
        "the next request is served warm by the same instance"
    );
    c.wait_for("scale to zero", Duration::from_secs(20), || async {
        Ok(c.live_instances("hello").await? == 0)
    })
    .await?;
    let third: Value = c.get("hello", "/env").await?.json().await?;
    assert_ne!(
        first["HOSTNAME"], third["HOSTNAME"],
        "after scale to zero a new instance cold-starts"
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn knative_runtime_contract() -> Result<()> {
    let (c, _) = cluster_with_app("contract", json!({ "env": { "GREETING": "hi" } })).await?;
    let env: Value = c.get("contract", "/env").await?.json().await?;
    assert_eq!(env["PORT"], "8080");
    assert_eq!(env["K_SERVICE"], "contract");
    assert_eq!(env["K_CONFIGURATION"], "contract");
    assert_eq!(env["K_REVISION"], "contract-00001");
    assert_eq!(env["GREETING"], "hi");

    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let h: Value = c
        .request(reqwest::Method::GET, "contract", "/headers")
        .header("traceparent", tp)
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "1")
        .send()
        .await?
        .json()
        .await?;
    let headers = &h["headers"];
    assert_eq!(headers["host"], "contract.localhost");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], "contract.localhost");
    assert!(
        headers["forwarded"]
            .as_str()
            .unwrap()
            .contains("for=127.0.0.1"),
        "{headers}"
    );
    assert_eq!(headers["traceparent"], tp, "traceparent kept");
    assert!(
        headers.get("x-drop-me").is_none(),
        "hop-by-hop headers named in Connection are stripped"
    );
    // A fresh traceparent when none came.
    let h: Value = c.get("contract", "/headers").await?.json().await?;
    assert!(
        h["headers"]["traceparent"]
            .as_str()
            .is_some_and(|t| t.len() == 55)
    );

    let tmp: Value = c.get("contract", "/tmp").await?.json().await?;
    assert_eq!(tmp["mode"], "1777");
    assert_eq!(tmp["writable"], true);
    let dev: Value = c.get("contract", "/dev").await?.json().await?;
    let names: Vec<&str> = dev
        .as_array()
        .context("/dev answers a JSON array")?
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for n in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "fd", "stdin", "stdout",
        "stderr",
    ] {
        assert!(names.contains(&n), "/dev/{n} missing: {names:?}");
    }
    assert!(!names.contains(&"console"), "/dev/console must not exist");
    let stdin: Value = c.get("contract", "/stdin").await?.json().await?;
    assert_eq!(stdin["at_eof"], true);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_requests_at_zero() -> Result<()> {
    let (c, _) = cluster_with_app("burst", json!({ "target_concurrency": 20 })).await?;
    let reqs = (0..50).map(|_| {
        let c = &c;
        async move {
            let r = c.get("burst", "/sleep?ms=300").await?;
            let s = r.status().as_u16();
            if s != 200 {
                eprintln!("{s}: {}", r.text().await?);
            }
            anyhow::Ok(s)
        }
    });
    let statuses = futures_util::future::join_all(reqs).await;
    for s in &statuses {
        assert_eq!(*s.as_ref().unwrap(), 200, "{statuses:?}");
    }
    let started = c.instances("burst").await?.len();
    assert!(
        (1..=3).contains(&started),
        "50 requests at target 20 need at most 3 instances; {started} started"
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redeploy_under_steady_load_loses_no_request() -> Result<()> {
    // Min 0, the default: the new revision gets an instance of its own before the traffic
    // moves (before, with the demand all on the old revision, nothing asked for one and the
    // rollout waited until the load stopped).
    let (c, image) = cluster_with_app("steady", json!({})).await?;
    assert_eq!(c.get("steady", "/env").await?.status(), 200);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (c, stop) = (&c, stop.clone());
        workers.push(async move {
            let (mut ok, mut failed, mut revisions) =
                (0u32, Vec::new(), std::collections::BTreeSet::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.get("steady", "/env").await {
                    Ok(r) if r.status() == 200 => {
                        ok += 1;
                        let v: Value = r.json().await.unwrap_or_default();
                        revisions.insert(v["K_REVISION"].as_str().unwrap_or("").to_string());
                    }
                    Ok(r) => failed.push(format!(
                        "{} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed, revisions)
        });
    }
    let driver = async {
        let r = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let s = c.deploy("steady", &json!({ "image": image, "cpu": "0.5", "memory": "128Mi", "env": { "V": "2" } })).await?;
            assert_eq!(s.latest_revision, "steady-00002");
            c.wait_for("rollout", Duration::from_secs(20), || async {
                let s = c.service("steady").await?;
                Ok(s.traffic
                    .iter()
                    .any(|t| t.revision == "steady-00002" && t.percent == 100))
            })
            .await?;
            // Keep the load on while the old revision drains and stops.
            tokio::time::sleep(Duration::from_secs(3)).await;
            anyhow::Ok(())
        }
        .await;
        // The workers stop whatever happened, or a failure would hang the test.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    };
    let (results, d) = tokio::join!(futures_util::future::join_all(workers), driver);
    d?;
    let total: u32 = results.iter().map(|r| r.0).sum();
    let failed: Vec<&String> = results.iter().flat_map(|r| r.1.iter()).collect();
    let seen: std::collections::BTreeSet<&String> =
        results.iter().flat_map(|r| r.2.iter()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        total,
        &failed[..failed.len().min(5)]
    );
    assert!(total > 50, "load too light to prove anything: {total}");
    assert!(
        seen.iter().any(|r| *r == "steady-00001") && seen.iter().any(|r| *r == "steady-00002"),
        "{seen:?}"
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_errors_are_clear() -> Result<()> {
    let c = TestCluster::start().await?;
    let image = c.push_testapp("testapp", "v1").await?;
    let (s, body) = c
        .deploy_raw(
            "app",
            &json!({ "image": format!("{}/testapp:missing", c.registry) }),
        )
        .await?;
    assert_eq!(s, 422, "{body}");
    assert_eq!(body["code"], "image_not_found");
    assert!(
        body["message"].as_str().unwrap().contains("missing"),
        "{body}"
    );
    assert!(body["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    let (s, body) = c
        .deploy_raw("app", &json!({ "image": image, "cpu": "lots" }))
        .await?;
    assert_eq!((s, body["code"].as_str()), (400, Some("invalid_spec")));
    assert!(
        body["message"].as_str().unwrap().starts_with("cpu:"),
        "{body}"
    );
    let (s, body) = c
        .deploy_raw("app", &json!({ "image": image, "memroy": "1Gi" }))
        .await?;
    assert_eq!(s, 400);
    assert!(
        body["message"].as_str().unwrap().contains("memroy"),
        "{body}"
    );
    let (s, _) = c.deploy_raw("Bad_Name", &json!({ "image": image })).await?;
    assert_eq!(s, 400);
    let r = c
        .http
        .get(format!("{}/v1/services/ghost", c.api))
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    let r = c.get("ghost", "/").await?;
    assert_eq!(r.status(), 404);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_and_exec_through_the_api() -> Result<()> {
    let (c, _) = cluster_with_app("logged", json!({})).await?;
    // No instance yet: exec says so.
    let r = c
        .http
        .post(format!("{}/v1/services/logged/exec", c.api))
        .json(&json!({ "argv": ["/testapp"] }))
        .send()
        .await?;
    assert_eq!(r.status(), 409);
    assert_eq!(c.get("logged", "/env").await?.status(), 200);
    // The agent writes lines to the log within milliseconds of the instance's write
    // (batched; docs/agent.md), so the instance's first line may trail its readiness.
    let listening = |text: &str| {
        text.lines()
            .any(|l| l.contains(" stdout ") && l.contains("listening"))
    };
    if let Err(e) = c
        .wait_for(
            "the instance's first stdout line",
            Duration::from_secs(5),
            || async { Ok(listening(&c.logs("logged", "").await?)) },
        )
        .await
    {
        anyhow::bail!("{e}; the log:\n{}", c.logs("logged", "").await?);
    }
    // Exec runs inside the instance: a second testapp finds the port taken in its netns.
    let v: Value = c
        .http
        .post(format!("{}/v1/services/logged/exec", c.api))
        .json(&json!({ "argv": ["/testapp"] }))
        .send()
        .await?
        .json()
        .await?;
    assert_ne!(v["code"], 0, "{v}");
    assert!(
        v["stderr"]
            .as_str()
            .unwrap_or("")
            .to_lowercase()
            .contains("in use"),
        "{v}"
    );
    // A followed log stream delivers lines as they come.
    let mut follow = c
        .http
        .get(format!("{}/v1/services/logged/logs?follow=true", c.api))
        .send()
        .await?;
    let first = tokio::time::timeout(Duration::from_secs(5), follow.chunk()).await??;
    assert!(first.is_some_and(|b| !b.is_empty()));
    drop(follow);
    let r = c
        .http
        .get(format!("{}/v1/services/ghost/logs", c.api))
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    c.stop().await
}

/// A cluster dropped without `stop` (a test that failed half-way) still stops its instances:
/// failed runs had left their instances running on the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_dropped_without_stop_stops_its_instances() -> Result<()> {
    let (c, _) = cluster_with_app("orphan", json!({ "min_instances": 1 })).await?;
    let id = the_ready_instance(&c, "orphan").await?;
    let cgroup = ["/sys/fs/cgroup/cpu/ferry", "/sys/fs/cgroup/ferry"]
        .iter()
        .map(|root| std::path::Path::new(root).join(&id))
        .find(|p| p.exists())
        .context("the instance's cgroup")?;
    drop(c);
    assert!(
        !cgroup.exists(),
        "{} outlived its cluster",
        cgroup.display()
    );
    Ok(())
}

/// With registry auth on, the registry refuses anonymous pulls, and the platform still deploys
/// and starts images from it (its own pulls carry a token of the server's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deploys_work_with_registry_auth_on() -> Result<()> {
    let c = TestCluster::start_configured(|a| a.registry_users = vec!["dev:s3cret".into()]).await?;
    let image = c.push_testapp("private", "v1").await?;
    let anonymous = c
        .http
        .get(format!("http://{}/v2/private/manifests/v1", c.registry))
        .send()
        .await?;
    assert_eq!(anonymous.status(), 401, "the registry asks for credentials");
    c.deploy(
        "private",
        &json!({ "image": image, "cpu": "0.5", "memory": "128Mi" }),
    )
    .await?;
    let r = c.get("private", "/env").await?;
    assert_eq!(r.status(), 200, "{}", r.text().await?);
    c.stop().await
}

/// An h2c service is spoken to over HTTP/2 and sees the client's host as the request's
/// authority, as an HTTP/1.1 one sees it in `Host`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_instances_see_the_client_host() -> Result<()> {
    let (c, _) = cluster_with_app("grpcish", json!({ "h2c": true })).await?;
    for _ in 0..2 {
        let v: Value = c.get("grpcish", "/headers?x=1").await?.json().await?;
        assert_eq!(v["version"], "HTTP/2.0", "{v}");
        assert_eq!(v["uri"], "http://grpcish.localhost/headers?x=1", "{v}");
        assert_eq!(v["headers"]["x-forwarded-host"], "grpcish.localhost", "{v}");
    }
    c.stop().await
}

/// When the only instance of a service crashes, the next requests wait for its replacement
/// (as on a cold start) instead of failing; an instance that cannot start fails them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_is_replaced_while_requests_wait() -> Result<()> {
    let (c, image) = cluster_with_app("crashy", json!({ "min_instances": 1 })).await?;
    let first = the_ready_instance(&c, "crashy").await?;
    let r = c.get("crashy", "/crash?code=3").await?;
    assert_eq!(r.status(), 502, "the crashing request itself has no answer");
    c.wait_for("the crash to be seen", Duration::from_secs(10), || async {
        Ok(c.instances("crashy")
            .await?
            .iter()
            .any(|i| i.id == first && i.state == ferry_api::agent::InstanceState::Failed))
    })
    .await?;
    // Straight after: held until the replacement is ready, then answered by it.
    let r = c.get("crashy", "/env").await?;
    assert_eq!(r.status(), 200, "{}", r.text().await?);
    let v: Value = r.json().await?;
    assert_ne!(v["HOSTNAME"], first.as_str());
    // A service whose instances cannot start: requests fail at once, with the reason.
    c.deploy(
        "broken",
        &json!({ "image": image, "cpu": "0.5", "memory": "128Mi",
                 "env": { "TESTAPP_CRASH_ON_START": "7" } }),
    )
    .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.get("broken", "/").await?;
        let status = r.status();
        let body = r.text().await?;
        if status == 503 && body.contains("start_failure") && body.contains("code 7") {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no fast start failure: {status} {body}"
        );
    }
    c.stop().await
}

/// Every line of a log is `<RFC 3339> stdout|stderr|ferry <text>`.
fn assert_log_lines(log: &str) {
    for l in log.lines() {
        let mut parts = l.splitn(3, ' ');
        let (ts, stream) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        assert!(
            ts.len() >= 20 && ts.contains('T') && matches!(stream, "stdout" | "stderr" | "ferry"),
            "not a log line: {l:?}"
        );
    }
}

/// An instance's log is capped (rotated at `--log-max-size`, two files kept) and can still be
/// read after the instance stopped and control forgot it (a minute later), followed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_are_capped_and_outlive_their_instance() -> Result<()> {
    let c = TestCluster::start_configured(|a| a.log_max_size = Some("4Ki".into())).await?;
    let image = c.push_testapp("testapp", "v1").await?;
    c.deploy(
        "chatty",
        &json!({
            "image": image, "cpu": "0.5", "memory": "128Mi", "max_instances": 1,
            "idle_grace_secs": 1, "autoscaling": { "stable_window_secs": 4 }
        }),
    )
    .await?;
    // 40 request lines of ~460 bytes: 18 KiB written through a 4 KiB cap.
    let pad = "p".repeat(400);
    for i in 0..40 {
        let r = c.get("chatty", &format!("/?n={i:03}&pad={pad}")).await?;
        assert_eq!(r.status(), 200);
    }
    c.wait_for(
        "the last request's line",
        Duration::from_secs(5),
        || async { Ok(c.logs("chatty", "").await?.contains("n=039")) },
    )
    .await?;
    let id = c.instances("chatty").await?[0].id.clone();
    let log = c.logs("chatty", "").await?;
    assert_log_lines(&log);
    assert!(
        !log.contains("n=000"),
        "the oldest lines rotated away:\n{log}"
    );
    assert!(log.len() <= 3 * 4096, "{} bytes kept", log.len());
    let mut files: Vec<String> = std::fs::read_dir(c.log_dir())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    files.sort();
    assert_eq!(files, [format!("{id}.log"), format!("{id}.log.1")]);

    // Idle: scaled to zero within seconds. Control forgets the stopped instance after a minute;
    // its log is still there, by the usage record and the node that ran it.
    c.wait_for(
        "control to forget the instance",
        Duration::from_secs(120),
        || async { Ok(c.instances("chatty").await?.is_empty()) },
    )
    .await?;
    for query in ["", &format!("instance={id}")] {
        let log = c.logs("chatty", query).await?;
        assert!(
            log.contains("n=039") && log.contains("got SIGTERM"),
            "{query}: {log}"
        );
    }
    // Following a stopped instance's log gives what it holds and ends.
    let followed = tokio::time::timeout(Duration::from_secs(10), c.logs("chatty", "follow=true"))
        .await
        .context("following a stopped instance's log ends")??;
    assert!(followed.contains("got SIGTERM"), "{followed}");
    let r = c
        .http
        .get(format!(
            "{}/v1/services/chatty/logs?instance=chatty-nope",
            c.api
        ))
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    c.stop().await
}

/// The logs of instances that no longer run go after `--log-retention`; a running instance's
/// log stays however long it has been quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_of_stopped_instances_go_after_the_retention() -> Result<()> {
    let c = TestCluster::start_configured(|a| a.log_retention = Some("1s".into())).await?;
    let image = c.push_testapp("testapp", "v1").await?;
    let spec = |extra: Value| {
        let mut s = json!({ "image": image, "cpu": "0.5", "memory": "128Mi" });
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    };
    c.deploy("brief", &spec(json!({ "idle_grace_secs": 1 })))
        .await?;
    c.deploy("steady", &spec(json!({ "min_instances": 1 })))
        .await?;
    assert_eq!(c.get("brief", "/").await?.status(), 200);
    let brief = c.instances("brief").await?[0].id.clone();
    let steady = the_ready_instance(&c, "steady").await?;
    let path = |id: &str| c.log_dir().join(format!("{id}.log"));
    c.wait_for(
        "the stopped instance's log to go",
        Duration::from_secs(30),
        || async { Ok(!path(&brief).exists()) },
    )
    .await?;
    let r = c
        .http
        .get(format!("{}/v1/services/brief/logs?instance={brief}", c.api))
        .send()
        .await?;
    assert_eq!(r.status(), 404, "{}", r.text().await?);
    // Quiet for longer than the retention, and kept: it runs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(path(&steady).exists());
    assert!(c.logs("steady", "").await?.contains("listening on"));
    c.stop().await
}

/// SIGTERM first, SIGKILL after the termination grace: an instance that ignores SIGTERM is
/// killed once the grace is over; one that honours it ends at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_then_sigkill_after_the_grace() -> Result<()> {
    let spec = |ignore: &str| json!({ "min_instances": 1, "termination_grace_secs": 3, "env": { "TESTAPP_IGNORE_SIGTERM": ignore } });
    let (c, image) = cluster_with_app("sig", spec("1")).await?;
    let ready_of = |rev: &'static str| {
        let c = &c;
        async move {
            let list = c.instances("sig").await?;
            Ok::<_, anyhow::Error>(
                list.into_iter()
                    .find(|i| {
                        i.revision == rev && i.state == ferry_api::agent::InstanceState::Ready
                    })
                    .map(|i| i.id),
            )
        }
    };
    let stopped = |id: String| {
        let c = &c;
        async move {
            Ok::<_, anyhow::Error>(
                c.instances("sig")
                    .await?
                    .iter()
                    .any(|i| i.id == id && i.state.is_terminal()),
            )
        }
    };
    c.wait_for("first instance", Duration::from_secs(20), || async {
        Ok(ready_of("sig-00001").await?.is_some())
    })
    .await?;
    let first = ready_of("sig-00001").await?.unwrap();

    // A new revision replaces it; the old one ignores SIGTERM, so only SIGKILL ends it.
    let mut s = spec("0");
    s["image"] = json!(image);
    s["cpu"] = json!("0.5");
    s["memory"] = json!("128Mi");
    let t = std::time::Instant::now();
    c.deploy("sig", &s).await?;
    c.wait_for(
        "the ignoring instance to end",
        Duration::from_secs(30),
        || stopped(first.clone()),
    )
    .await?;
    let ignoring = t.elapsed();
    let second = ready_of("sig-00002")
        .await?
        .expect("the new revision is ready");

    // And once more: this time the old instance honours SIGTERM.
    let t = std::time::Instant::now();
    c.deploy("sig", &s.clone()).await?;
    c.wait_for(
        "the honouring instance to end",
        Duration::from_secs(30),
        || stopped(second.clone()),
    )
    .await?;
    let honouring = t.elapsed();

    assert!(
        ignoring >= Duration::from_millis(4_200),
        "drain 1.5 s + grace 3 s before SIGKILL; ended after {ignoring:?}"
    );
    assert!(
        honouring < Duration::from_millis(3_800),
        "SIGTERM alone ends it; took {honouring:?}"
    );
    let l1 = c.logs("sig", &format!("instance={first}")).await?;
    assert!(l1.contains("got SIGTERM (ignored"), "{l1}");
    let l2 = c.logs("sig", &format!("instance={second}")).await?;
    assert!(l2.contains("got SIGTERM, draining"), "{l2}");
    c.stop().await
}

/// `--cpu-overcommit`: a node hands out its cores times the factor, so more vCPU of instances
/// than it has cores run at once; without it the same service cannot place them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cpu_overcommit_places_more_vcpu_than_cores() -> Result<()> {
    let cores = std::thread::available_parallelism()?.get() as u64;
    let c = TestCluster::start_configured(|a| a.cpu_overcommit = Some(3.0)).await?;
    let nodes = c.nodes().await?;
    assert_eq!(
        nodes[0]["cpu_allocatable"],
        json!(cores * 3000),
        "{nodes:?}"
    );
    let image = c.push_testapp("testapp", "v1").await?;
    // Twice the cores in whole vCPUs, each instance with its own 1-vCPU limit.
    let want = (cores * 2) as usize;
    let spec = json!({ "image": image, "cpu": "1", "memory": "64Mi",
                       "min_instances": want, "max_instances": want });
    c.deploy("packed", &spec).await?;
    c.wait_for("every instance ready", Duration::from_secs(60), || async {
        Ok(ready(&c, "packed").await? == want)
    })
    .await?;
    let failure = c.service("packed").await?.last_failure;
    assert_eq!(failure, None);
    c.stop().await?;

    // The default: the node offers its cores once, and says so when it is full.
    let c = TestCluster::start().await?;
    let image = c.push_testapp("testapp", "v1").await?;
    let spec = json!({ "image": image, "cpu": "1", "memory": "64Mi",
                       "min_instances": want, "max_instances": want });
    c.deploy("packed", &spec).await?;
    c.wait_for("a placement failure", Duration::from_secs(60), || async {
        let failure = c.service("packed").await?.last_failure;
        Ok(failure.is_some_and(|f| f.contains("no node has 1 CPU")))
    })
    .await?;
    c.wait_for(
        "the instances that fit",
        Duration::from_secs(60),
        || async { Ok(ready(&c, "packed").await? == cores as usize) },
    )
    .await?;
    assert_eq!(c.live_instances("packed").await?, cores as usize);
    c.stop().await
}

/// Waits (20 s at most) for `service`'s one ready instance; its id.
async fn the_ready_instance(c: &TestCluster, service: &str) -> Result<String> {
    c.wait_for(
        &format!("{service} to be ready"),
        Duration::from_secs(20),
        || async { Ok(ready(c, service).await? == 1) },
    )
    .await?;
    c.instances(service)
        .await?
        .into_iter()
        .find(|i| i.state == ferry_api::agent::InstanceState::Ready)
        .map(|i| i.id)
        .context("the ready instance")
}

async fn ready(c: &TestCluster, service: &str) -> Result<usize> {
    Ok(c.instances(service)
        .await?
        .iter()
        .filter(|i| i.state == ferry_api::agent::InstanceState::Ready)
        .count())
}
