//! The gateway over real sockets: axum upstream "instances" on 127.0.0.1:0, the gateway on
//! 127.0.0.1:0 fed by a watch channel the test controls, reqwest and tungstenite as clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use ferry_api::gateway::{
    Endpoint, GatewayEvent, RevisionRoute, RouteTable, ServiceRoute, TrafficTarget,
};
use ferry_gateway::{Config, serve};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

// ---------- upstream instances ----------

#[derive(Clone)]
struct Inst {
    name: String,
    addr: SocketAddr,
    current: Arc<AtomicU32>,
    max: Arc<AtomicU32>,
    hits: Arc<AtomicU32>,
    /// `id`s of /slow requests in the order they reached the instance.
    order: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Inst {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            instance_id: self.name.clone(),
            address: self.addr,
        }
    }
}

async fn info(State(s): State<Inst>, req: Request) -> Json<Value> {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let mut h = serde_json::Map::new();
    for (k, v) in req.headers() {
        h.insert(k.to_string(), json!(v.to_str().unwrap_or("")));
    }
    Json(json!({
        "instance": s.name,
        "version": format!("{:?}", req.version()),
        "path": req.uri().to_string(),
        "headers": h,
    }))
}

#[derive(serde::Deserialize)]
struct Ms {
    ms: u64,
    id: Option<String>,
}

async fn slow(State(s): State<Inst>, Query(q): Query<Ms>) -> String {
    s.hits.fetch_add(1, Ordering::SeqCst);
    if let Some(id) = q.id {
        s.order.lock().unwrap().push(id);
    }
    let now = s.current.fetch_add(1, Ordering::SeqCst) + 1;
    s.max.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(q.ms)).await;
    s.current.fetch_sub(1, Ordering::SeqCst);
    s.name.clone()
}

async fn stream() -> Response {
    let chunks = futures_util::stream::iter(0..2).then(|i| async move {
        if i == 1 {
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        Ok::<_, Infallible>(Bytes::from(format!("chunk{i}\n")))
    });
    Response::builder()
        .header("keep-alive", "timeout=5")
        .body(Body::from_stream(chunks))
        .unwrap()
}

async fn upload(body: Bytes) -> String {
    body.len().to_string()
}

async fn ws(ws: WebSocketUpgrade) -> impl IntoResponse {
    ws.on_upgrade(|mut sock| async move {
        while let Some(Ok(m)) = sock.recv().await {
            use axum::extract::ws::Message;
            if matches!(m, Message::Text(_) | Message::Binary(_)) && sock.send(m).await.is_err() {
                break;
            }
        }
    })
}

async fn instance(name: &str) -> Inst {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inst = Inst {
        name: name.to_string(),
        addr: listener.local_addr().unwrap(),
        current: Arc::default(),
        max: Arc::default(),
        hits: Arc::default(),
        order: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/slow", get(slow))
        .route("/stream", get(stream))
        .route("/upload", post(upload))
        .route("/ws", any(ws))
        .fallback(info)
        .with_state(inst.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    inst
}

/// An address nothing listens on.
async fn dead_address() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

// ---------- route tables ----------

fn rev(name: &str, insts: &[&Inst]) -> RevisionRoute {
    RevisionRoute {
        revision: name.to_string(),
        container_concurrency: 0,
        request_timeout_ms: 5000,
        max_body_bytes: 1 << 20,
        h2c: false,
        queue_limit: 16,
        instances: insts.iter().map(|i| i.endpoint()).collect(),
        start_failure: None,
    }
}

fn svc(name: &str, revs: Vec<RevisionRoute>, split: &[(&str, u8)]) -> ServiceRoute {
    ServiceRoute {
        service: name.to_string(),
        traffic: split
            .iter()
            .map(|(r, p)| TrafficTarget {
                revision: r.to_string(),
                percent: *p,
            })
            .collect(),
        revisions: revs,
    }
}

fn one(name: &str, r: RevisionRoute) -> ServiceRoute {
    let rn = r.revision.clone();
    svc(name, vec![r], &[(&rn, 100)])
}

fn table(services: Vec<ServiceRoute>) -> RouteTable {
    static V: AtomicU32 = AtomicU32::new(1);
    RouteTable {
        version: u64::from(V.fetch_add(1, Ordering::SeqCst)),
        services,
    }
}

// ---------- the gateway ----------

struct Gw {
    addr: SocketAddr,
    routes: watch::Sender<RouteTable>,
    events: mpsc::Receiver<GatewayEvent>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ferry_gateway::Error>>,
    http: reqwest::Client,
}

impl Gw {
    async fn start(t: RouteTable) -> Gw {
        Self::start_with(t, Duration::from_secs(1)).await
    }

    async fn start_with(t: RouteTable, stats_interval: Duration) -> Gw {
        Self::start_config(
            t,
            Config {
                domain: "localhost".into(),
                stats_interval,
                ..Config::default()
            },
        )
        .await
    }

    async fn start_config(t: RouteTable, config: Config) -> Gw {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (routes, rx) = watch::channel(t);
        let (tx, events) = mpsc::channel(256);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, config, rx, tx, shutdown.clone()));
        Gw {
            addr,
            routes,
            events,
            shutdown,
            task,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    fn host(&self, service: &str) -> String {
        format!("{service}.localhost:{}", self.addr.port())
    }

    fn get(&self, service: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("http://{}{path}", self.addr))
            .header("host", self.host(service))
    }

    fn post(&self, service: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("http://{}{path}", self.addr))
            .header("host", self.host(service))
    }

    fn publish(&self, t: RouteTable) {
        self.routes.send_replace(t);
    }

    async fn demand(&mut self) -> Result<(String, String, u32)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .context("no demand event within 3 s")?
                .context("events closed")?;
            if let GatewayEvent::Demand {
                service,
                revision,
                waiting,
            } = ev
            {
                return Ok((service, revision, waiting));
            }
        }
    }
}

async fn json_of(r: reqwest::Response) -> Result<Value> {
    Ok(r.json::<Value>().await?)
}

// ---------- tests ----------

#[tokio::test]
async fn routes_by_host_and_404_for_unknown() -> Result<()> {
    let a = instance("a").await;
    let b = instance("b").await;
    let gw = Gw::start(table(vec![
        one("alpha", rev("r1", &[&a])),
        one("beta", rev("r1", &[&b])),
    ]))
    .await;

    let r = gw.get("alpha", "/x?y=1").send().await?;
    assert_eq!(r.status(), 200);
    let v = json_of(r).await?;
    assert_eq!(v["instance"], "a");
    assert_eq!(v["path"], "/x?y=1");

    let r = gw
        .http
        .get(format!("http://{}/", gw.addr))
        .header("host", format!("BETA.LocalHost:{}", gw.addr.port()))
        .send()
        .await?;
    assert_eq!(json_of(r).await?["instance"], "b");

    let r = gw.get("gamma", "/").send().await?;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-ferry-error-source"], "client");
    assert_eq!(r.headers()["content-type"], "application/json");
    let id = r.headers()["x-request-id"].to_str()?.to_string();
    let v = json_of(r).await?;
    assert_eq!(v["code"], "service_not_found");
    assert!(v["message"].as_str().unwrap().contains("gamma"));
    assert_eq!(v["request_id"], id);

    let r = gw
        .http
        .get(format!("http://{}/", gw.addr))
        .header("host", "alpha.example.com")
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    Ok(())
}

#[tokio::test]
async fn http2_clients_route_by_authority() -> Result<()> {
    let a = instance("a").await;
    let gw = Gw::start(table(vec![one("alpha", rev("r1", &[&a]))])).await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .resolve("alpha.localhost", gw.addr)
        .build()?;
    let r = h2
        .get(format!("http://alpha.localhost:{}/h2", gw.addr.port()))
        .send()
        .await?;
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let v = json_of(r).await?;
    assert_eq!(v["instance"], "a");
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(
        v["headers"]["x-forwarded-host"],
        format!("alpha.localhost:{}", gw.addr.port())
    );
    Ok(())
}

#[tokio::test]
async fn traffic_split_is_roughly_respected() -> Result<()> {
    let a = instance("a").await;
    let b = instance("b").await;
    let gw = Gw::start(table(vec![svc(
        "split",
        vec![rev("r1", &[&a]), rev("r2", &[&b])],
        &[("r1", 80), ("r2", 20)],
    )]))
    .await;
    let mut to_a = 0;
    for _ in 0..300 {
        let v = json_of(gw.get("split", "/").send().await?).await?;
        if v["instance"] == "a" {
            to_a += 1;
        }
    }
    // 80% of 300 = 240, sd ≈ 7: a wide band that still catches a wrong split.
    assert!((200..=280).contains(&to_a), "r1 got {to_a} of 300");
    Ok(())
}

#[tokio::test]
async fn forwarding_headers_set_and_hop_by_hop_stripped() -> Result<()> {
    let a = instance("a").await;
    let gw = Gw::start(table(vec![one("alpha", rev("r1", &[&a]))])).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = gw
        .get("alpha", "/")
        .header("traceparent", tp)
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-request-id", "req-123")
        .send()
        .await?;
    assert_eq!(r.headers()["x-request-id"], "req-123");
    let v = json_of(r).await?;
    let h = &v["headers"];
    assert_eq!(h["traceparent"], tp);
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], gw.host("alpha"));
    assert_eq!(
        h["forwarded"],
        format!("for=127.0.0.1;host=\"{}\";proto=http", gw.host("alpha"))
    );
    assert_eq!(h["x-request-id"], "req-123");
    assert_eq!(h["host"], gw.host("alpha"));
    for gone in [
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(h.get(gone).is_none(), "{gone} reached the instance: {h}");
    }

    // No traceparent: a valid one is generated; no request id: one is made.
    let v = json_of(gw.get("alpha", "/").send().await?).await?;
    let tp = v["headers"]["traceparent"].as_str().unwrap();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1].len(), 32);
    assert_eq!(parts[2].len(), 16);
    assert!(parts[1].chars().all(|c| c.is_ascii_hexdigit()));
    assert!(!v["headers"]["x-request-id"].as_str().unwrap().is_empty());
    Ok(())
}

#[tokio::test]
async fn streamed_response_arrives_incrementally() -> Result<()> {
    let a = instance("a").await;
    let gw = Gw::start(table(vec![one("alpha", rev("r1", &[&a]))])).await;
    let start = Instant::now();
    let r = gw.get("alpha", "/stream").send().await?;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("keep-alive").is_none(),
        "hop-by-hop header in response"
    );
    let mut s = r.bytes_stream();
    let first = s.next().await.context("no first chunk")??;
    let t_first = start.elapsed();
    assert_eq!(&first[..], b"chunk0\n");
    assert!(
        t_first < Duration::from_millis(500),
        "first chunk after {t_first:?}"
    );
    let mut rest = Vec::new();
    while let Some(c) = s.next().await {
        rest.extend_from_slice(&c?);
    }
    assert_eq!(rest, b"chunk1\n");
    assert!(start.elapsed() >= Duration::from_millis(650));
    Ok(())
}

#[tokio::test]
async fn container_concurrency_is_never_exceeded() -> Result<()> {
    let a = instance("a").await;
    let b = instance("b").await;
    let mut r = rev("r1", &[&a, &b]);
    r.container_concurrency = 1;
    let gw = Gw::start(table(vec![one("alpha", r)])).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let req = gw.get("alpha", "/slow?ms=80");
        tasks.push(tokio::spawn(
            async move { req.send().await?.error_for_status() },
        ));
    }
    for t in tasks {
        t.await??;
    }
    assert_eq!(a.max.load(Ordering::SeqCst), 1);
    assert_eq!(b.max.load(Ordering::SeqCst), 1);
    assert_eq!(
        a.hits.load(Ordering::SeqCst) + b.hits.load(Ordering::SeqCst),
        8
    );
    assert!(a.hits.load(Ordering::SeqCst) >= 2 && b.hits.load(Ordering::SeqCst) >= 2);
    Ok(())
}

#[tokio::test]
async fn cold_start_holds_until_an_instance_is_published() -> Result<()> {
    let mut gw = Gw::start(table(vec![one("cold", rev("r1", &[]))])).await;
    let req = gw.get("cold", "/hello");
    let pending = tokio::spawn(async move { req.send().await });
    let (service, revision, waiting) = gw.demand().await?;
    assert_eq!(
        (service.as_str(), revision.as_str(), waiting),
        ("cold", "r1", 1)
    );
    // Still held, and reminded about.
    let (_, _, waiting) = gw.demand().await?;
    assert_eq!(waiting, 1);
    assert!(!pending.is_finished());

    let a = instance("a").await;
    gw.publish(table(vec![one("cold", rev("r1", &[&a]))]));
    let r = tokio::time::timeout(Duration::from_secs(2), pending).await???;
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await?["instance"], "a");
    Ok(())
}

#[tokio::test]
async fn full_queue_is_503_with_retry_after() -> Result<()> {
    let mut r = rev("r1", &[]);
    r.queue_limit = 1;
    let mut gw = Gw::start(table(vec![one("cold", r.clone())])).await;
    let req = gw.get("cold", "/");
    let held = tokio::spawn(async move { req.send().await });
    gw.demand().await?;
    let resp = gw.get("cold", "/").send().await?;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.headers()["x-ferry-error-source"], "platform");
    assert_eq!(json_of(resp).await?["code"], "queue_full");

    // A start failure published while held answers the held request with the reason.
    r.start_failure = Some("image pull failed: manifest unknown".into());
    gw.publish(table(vec![one("cold", r)]));
    let resp = tokio::time::timeout(Duration::from_secs(2), held).await???;
    assert_eq!(resp.status(), 503);
    let v = json_of(resp).await?;
    assert_eq!(v["code"], "start_failure");
    assert!(
        v["message"].as_str().unwrap().contains("manifest unknown"),
        "{v}"
    );
    Ok(())
}

#[tokio::test]
async fn start_failure_is_503_naming_the_reason() -> Result<()> {
    let mut r = rev("r1", &[]);
    r.start_failure = Some("exec format error".into());
    let gw = Gw::start(table(vec![one("broken", r)])).await;
    let resp = gw.get("broken", "/").send().await?;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-ferry-error-source"], "platform");
    let v = json_of(resp).await?;
    assert!(
        v["message"].as_str().unwrap().contains("exec format error"),
        "{v}"
    );
    Ok(())
}

#[tokio::test]
async fn timeouts_are_504() -> Result<()> {
    let a = instance("a").await;
    let mut cold = rev("r1", &[]);
    cold.request_timeout_ms = 300;
    let mut slow = rev("r1", &[&a]);
    slow.request_timeout_ms = 300;
    let gw = Gw::start(table(vec![one("cold", cold), one("slow", slow)])).await;

    let start = Instant::now();
    let resp = gw.get("cold", "/").send().await?;
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["x-ferry-error-source"], "platform");
    assert!(start.elapsed() < Duration::from_secs(2));

    let resp = gw.get("slow", "/slow?ms=3000").send().await?;
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["x-ferry-error-source"], "instance");
    assert_eq!(json_of(resp).await?["code"], "upstream_timeout");
    assert!(start.elapsed() < Duration::from_secs(2));
    Ok(())
}

#[tokio::test]
async fn body_limit_is_413() -> Result<()> {
    let a = instance("a").await;
    let mut r = rev("r1", &[&a]);
    r.max_body_bytes = 1000;
    let gw = Gw::start(table(vec![one("alpha", r)])).await;

    let ok = gw
        .post("alpha", "/upload")
        .body(vec![b'x'; 1000])
        .send()
        .await?;
    assert_eq!(ok.text().await?, "1000");

    let resp = gw
        .post("alpha", "/upload")
        .body(vec![b'x'; 2000])
        .send()
        .await?;
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.headers()["x-ferry-error-source"], "client");

    // Chunked, no Content-Length: cut while streaming.
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 300]))),
    );
    let resp = gw
        .post("alpha", "/upload")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await?;
    assert_eq!(resp.status(), 413);
    Ok(())
}

#[tokio::test]
async fn websocket_echo_through_gateway() -> Result<()> {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let a = instance("a").await;
    let gw = Gw::start(table(vec![one("alpha", rev("r1", &[&a]))])).await;
    let req = format!("ws://{}/ws", gw.host("alpha")).into_client_request()?;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await?;
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp).await?;
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await?;
        let m = tokio::time::timeout(Duration::from_secs(2), ws.next())
            .await?
            .context("closed")??;
        assert_eq!(m.into_text()?.as_str(), format!("hello {i}"));
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await?;
    let m = ws.next().await.context("closed")??;
    assert_eq!(m.into_data().as_ref(), &[1, 2, 3]);
    ws.close(None).await?;
    Ok(())
}

#[tokio::test]
async fn h2c_upstream() -> Result<()> {
    let a = instance("a").await;
    let mut r = rev("r1", &[&a]);
    r.h2c = true;
    let gw = Gw::start(table(vec![one("alpha", r)])).await;
    for _ in 0..3 {
        let v = json_of(gw.get("alpha", "/h2c").send().await?).await?;
        assert_eq!(v["version"], "HTTP/2.0");
        assert_eq!(v["headers"]["x-forwarded-host"], gw.host("alpha"));
        // The client's host is the request's authority, as `Host` is over HTTP/1.1 (it was
        // the instance's own address).
        assert_eq!(v["path"], format!("http://{}/h2c", gw.host("alpha")));
    }
    let ok = gw
        .post("alpha", "/upload")
        .body(vec![b'x'; 500])
        .send()
        .await?;
    assert_eq!(ok.text().await?, "500");
    // A refused h2c connection sends the request to another instance, as over HTTP/1.1.
    let b = instance("b").await;
    let mut r = rev("r1", &[&b]);
    r.h2c = true;
    r.instances.insert(
        0,
        Endpoint {
            instance_id: "dead".into(),
            address: dead_address().await,
        },
    );
    gw.publish(table(vec![one("alpha", r)]));
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..6 {
        let v = json_of(gw.get("alpha", "/h2c").send().await?).await?;
        assert_eq!(v["instance"], "b");
    }
    Ok(())
}

/// A refused connection (nothing sent) sends the request back to the hold queue without that
/// instance: served by another one at once, or by the one the route table publishes next (a
/// crashed single instance's replacement), or answered 504 at its deadline. Before, a revision
/// whose only instance had just crashed answered 502 until the route table caught up.
#[tokio::test]
async fn a_refused_connection_holds_the_request_for_another_instance() -> Result<()> {
    let dead = Endpoint {
        instance_id: "dead".into(),
        address: dead_address().await,
    };
    let mut only_dead = rev("r1", &[]);
    only_dead.instances = vec![dead.clone()];
    only_dead.request_timeout_ms = 800;
    let a = instance("a").await;
    let mut mixed = rev("r1", &[&a]);
    mixed.instances.insert(0, dead.clone());
    let mut crashed = rev("r1", &[]);
    crashed.instances = vec![dead.clone()];
    let gw = Gw::start(table(vec![
        one("down", only_dead),
        one("mixed", mixed.clone()),
        one("crashed", crashed),
    ]))
    .await;

    for _ in 0..10 {
        let resp = gw.get("mixed", "/").send().await?;
        assert_eq!(resp.status(), 200, "served by the other instance");
        assert_eq!(json_of(resp).await?["instance"], "a");
    }
    // A POST with a body too: nothing reached the refusing instance.
    let resp = gw.post("mixed", "/").body("payload").send().await?;
    assert_eq!(resp.status(), 200);

    let t = Instant::now();
    let resp = gw.get("down", "/").send().await?;
    assert_eq!(resp.status(), 504);
    assert_eq!(json_of(resp).await?["code"], "no_instance");
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    // The same through the gateway's other path (HTTP/2 clients).
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .resolve("down.localhost", gw.addr)
        .resolve("mixed.localhost", gw.addr)
        .build()?;
    let url = |svc: &str| format!("http://{svc}.localhost:{}/", gw.addr.port());
    let resp = h2.get(url("down")).send().await?;
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 504);
    for _ in 0..10 {
        assert_eq!(h2.get(url("mixed")).send().await?.status(), 200);
    }

    let req = gw.get("crashed", "/after-the-crash");
    let pending = tokio::spawn(async move { req.send().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "held, not answered 502");
    let mut replaced = rev("r1", &[&a]);
    replaced.instances = vec![a.endpoint()];
    gw.publish(table(vec![one("crashed", replaced), one("mixed", mixed)]));
    let r = tokio::time::timeout(Duration::from_secs(2), pending).await???;
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await?["path"], "/after-the-crash");
    Ok(())
}

#[tokio::test]
async fn stats_report_requests_and_concurrency() -> Result<()> {
    let a = instance("a").await;
    let mut gw = Gw::start_with(
        table(vec![one("alpha", rev("r1", &[&a]))]),
        Duration::from_millis(400),
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let req = gw.get("alpha", "/slow?ms=200");
        tasks.push(tokio::spawn(
            async move { req.send().await?.error_for_status() },
        ));
    }
    for t in tasks {
        t.await??;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut requests = 0;
    let mut max = 0;
    let mut p99: f64 = 0.0;
    let mut egress = 0;
    while requests < 4 {
        let ev = tokio::time::timeout_at(deadline, gw.events.recv())
            .await
            .context("no stats")?
            .context("closed")?;
        if let GatewayEvent::Stats { at_ms, revisions } = ev {
            assert!(at_ms > 0);
            for s in revisions {
                assert_eq!((s.service.as_str(), s.revision.as_str()), ("alpha", "r1"));
                assert!(s.window_ms > 0);
                requests += s.requests;
                max = max.max(s.max_concurrency);
                p99 = p99.max(s.p99_latency_ms);
                egress += s.egress_bytes;
                assert!(s.avg_concurrency <= f64::from(s.max_concurrency) + 1e-9);
            }
        }
    }
    assert_eq!(requests, 4);
    assert_eq!(max, 4);
    assert!(p99 >= 190.0, "p99 {p99}");
    assert!(egress >= 4);
    Ok(())
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() -> Result<()> {
    let a = instance("a").await;
    let gw = Gw::start(table(vec![one("alpha", rev("r1", &[&a]))])).await;
    let req = gw.get("alpha", "/slow?ms=400");
    let pending = tokio::spawn(async move { req.send().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.shutdown.cancel();
    let resp = pending.await??;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await?, "a");
    tokio::time::timeout(Duration::from_secs(2), gw.task).await???;
    // No longer accepting.
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
    Ok(())
}

#[tokio::test]
async fn held_requests_are_served_in_arrival_order() -> Result<()> {
    let a = instance("a").await;
    let mut r = rev("r1", &[&a]);
    r.container_concurrency = 1;
    let gw = Gw::start(table(vec![one("alpha", r)])).await;
    let mut tasks = Vec::new();
    for id in ["first", "second", "third", "fourth"] {
        let req = gw.get("alpha", &format!("/slow?ms=150&id={id}"));
        tasks.push(tokio::spawn(
            async move { req.send().await?.error_for_status() },
        ));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for t in tasks {
        t.await??;
    }
    assert_eq!(
        *a.order.lock().unwrap(),
        ["first", "second", "third", "fourth"]
    );
    assert_eq!(a.max.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn a_client_that_gives_up_leaves_the_queue() -> Result<()> {
    let mut r = rev("r1", &[]);
    r.queue_limit = 1;
    let mut gw = Gw::start(table(vec![one("cold", r)])).await;
    let gave_up = gw
        .get("cold", "/")
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(
        gave_up.is_err(),
        "request should have been held, then abandoned"
    );
    gw.demand().await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The slot is free again: this one is held (demand sent), not refused with 503.
    let req = gw.get("cold", "/");
    let held = tokio::spawn(async move { req.send().await });
    let (_, _, waiting) = gw.demand().await?;
    assert_eq!(waiting, 1);
    assert!(!held.is_finished());
    held.abort();
    Ok(())
}

// ---------- raw HTTP/1.1, for what a client library hides ----------

/// One response read off a raw connection: status, headers (lower-case names), body. Bodies
/// are framed by Content-Length, chunked, or (`until_close`) by the end of the connection.
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    head_request: bool,
) -> Result<(u16, Vec<(String, String)>, Vec<u8>)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .with_context(|| format!("status line {line:?}"))?
        .parse()?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).await?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').context("header line")?;
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
    }
    let h = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if head_request || status == 204 || status == 304 {
    } else if h("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            line.clear();
            r.read_line(&mut line).await?;
            let size = line.trim_end().split(';').next().unwrap_or_default();
            let n = usize::from_str_radix(size, 16)?;
            if n == 0 {
                // Trailers, up to the blank line.
                loop {
                    line.clear();
                    r.read_line(&mut line).await?;
                    if line.trim_end().is_empty() {
                        break;
                    }
                    let (n, v) = line.trim_end().split_once(':').context("trailer line")?;
                    headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
                }
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).await?;
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = h("content-length") {
        body.resize(n.parse()?, 0);
        r.read_exact(&mut body).await?;
    } else {
        r.read_to_end(&mut body).await?;
    }
    Ok((status, headers, body))
}

/// An instance written by hand: for each request (head only), `answer` returns the bytes to
/// send and whether to close the connection after them.
async fn raw_instance(name: &str, answer: fn(&str) -> (String, bool)) -> Endpoint {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let (out, close) = answer(&head);
                    if s.write_all(out.as_bytes()).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    Endpoint {
        instance_id: name.to_string(),
        address,
    }
}

fn raw_rev(ep: Endpoint) -> RevisionRoute {
    let mut r = rev("r1", &[]);
    r.instances = vec![ep];
    r
}

/// Requests sent back to back on one connection are answered in order, also when one in the
/// middle needs hyper (a chunked body): the gateway's own path hands the connection over with
/// the bytes it has read, and hyper answers the rest.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_across_the_handoff() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let a = instance("a").await;
    let gw = Gw::start(table(vec![one("alpha", rev("r1", &[&a]))])).await;
    let host = gw.host("alpha");
    let mut s = tokio::net::TcpStream::connect(gw.addr).await?;
    let requests = format!(
        "GET /one HTTP/1.1\r\nHost: {host}\r\n\r\n\
         HEAD /head HTTP/1.1\r\nHost: {host}\r\n\r\n\
         POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\nabc\
         POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\n\r\n\
         GET /two HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(requests.as_bytes()).await?;
    let mut r = tokio::io::BufReader::new(s);
    let (status, _, body) = read_response(&mut r, false).await?;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<Value>(&body)?["path"], "/one");
    let (status, headers, body) = read_response(&mut r, true).await?;
    assert_eq!(status, 200);
    assert!(body.is_empty());
    assert!(
        headers.iter().any(|(n, _)| n == "x-request-id"),
        "{headers:?}"
    );
    let (status, _, body) = read_response(&mut r, false).await?;
    assert_eq!((status, body), (200, b"3".to_vec()));
    let (status, _, body) = read_response(&mut r, false).await?;
    assert_eq!((status, body), (200, b"4".to_vec()));
    let (status, _, body) = read_response(&mut r, false).await?;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<Value>(&body)?["path"], "/two");
    // Connection: close was honoured.
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut r, &mut rest).await?;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    Ok(())
}

/// HTTP/1.0 clients are served (by hyper); an instance's response without a length is
/// forwarded until the instance closes, and the client's connection is closed after it.
#[tokio::test]
async fn http_1_0_clients_and_responses_delimited_by_close() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = instance("a").await;
    let until_close = raw_instance("raw", |_| {
        ("HTTP/1.1 200 OK\r\nX-App: 1\r\n\r\nall of it".into(), true)
    })
    .await;
    let gw = Gw::start(table(vec![
        one("alpha", rev("r1", &[&a])),
        one("raw", raw_rev(until_close)),
    ]))
    .await;

    let mut s = tokio::net::TcpStream::connect(gw.addr).await?;
    let host = gw.host("alpha");
    s.write_all(format!("GET /old HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await??;
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    assert!(text.contains("\"/old\""), "{text}");

    let s = tokio::net::TcpStream::connect(gw.addr).await?;
    let mut r = tokio::io::BufReader::new(s);
    let host = gw.host("raw");
    r.get_mut()
        .write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let (status, headers, body) =
        tokio::time::timeout(Duration::from_secs(5), read_response(&mut r, false)).await??;
    assert_eq!(status, 200);
    assert_eq!(body, b"all of it");
    assert!(
        headers.contains(&("connection".into(), "close".into())),
        "{headers:?}"
    );
    assert!(
        headers.contains(&("x-app".into(), "1".into())),
        "{headers:?}"
    );
    Ok(())
}

/// An instance that closes each connection after answering, without saying so: the
/// gateway's idle connections to it are found closed and replaced, and no request fails.
#[tokio::test]
async fn connections_the_instance_closed_are_replaced() -> Result<()> {
    let closing = raw_instance("closing", |_| {
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".into(),
            true,
        )
    })
    .await;
    let gw = Gw::start(table(vec![one("closing", raw_rev(closing))])).await;
    for i in 0..30 {
        let r = gw.get("closing", "/").send().await?;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await?, "ok");
        if i % 3 == 0 {
            // Long enough for the close to be seen before the next request.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Chunked responses with trailers and informational responses before the final one.
#[tokio::test]
async fn chunked_trailers_and_informational_responses_pass() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let chunked = raw_instance("chunked", |head| {
        let out = if head.starts_with("GET /hints") {
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
             HTTP/1.1 204 No Content\r\nX-After: hints\r\n\r\n"
        } else {
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n\
             5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n"
        };
        (out.into(), false)
    })
    .await;
    let gw = Gw::start(table(vec![one("c", raw_rev(chunked))])).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await?;
    let host = gw.host("c");
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\nGET /hints HTTP/1.1\r\nHost: {host}\r\n\r\nGET / HTTP/1.1\r\nHost: {host}\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut r = tokio::io::BufReader::new(s);
    let (status, headers, body) = read_response(&mut r, false).await?;
    assert_eq!((status, body.as_slice()), (200, &b"hello world"[..]));
    assert!(
        headers.contains(&("transfer-encoding".into(), "chunked".into())),
        "{headers:?}"
    );
    assert!(
        headers.contains(&("x-sum".into(), "11".into())),
        "trailer: {headers:?}"
    );
    let (status, headers, _) = read_response(&mut r, false).await?;
    assert_eq!(status, 204);
    assert!(
        headers.contains(&("x-after".into(), "hints".into())),
        "{headers:?}"
    );
    let (status, _, body) = read_response(&mut r, false).await?;
    assert_eq!((status, body.as_slice()), (200, &b"hello world"[..]));
    Ok(())
}

/// A gateway config whose client timeout (300 ms) a test can wait out.
fn short_client_timeout() -> Config {
    Config {
        client_timeout: Duration::from_millis(300),
        ..Config::default()
    }
}

/// Reads until the gateway closes the connection; how long that took.
async fn closed_after(s: &mut tokio::net::TcpStream) -> Result<Duration> {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink))
        .await
        .context("connection still open after 5 s")??;
    Ok(start.elapsed())
}

/// Clients that send nothing, or part of a request, or stay idle after a response, are
/// closed after the client timeout, on the gateway's own path and (after a handoff) on
/// hyper's; waiting for a slow instance is not the client's time.
#[tokio::test]
async fn idle_and_slow_clients_are_closed_after_the_client_timeout() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let a = instance("a").await;
    let gw = Gw::start_config(
        table(vec![one("alpha", rev("r1", &[&a]))]),
        short_client_timeout(),
    )
    .await;
    let host = gw.host("alpha");

    let mut silent = tokio::net::TcpStream::connect(gw.addr).await?;
    let t = closed_after(&mut silent).await?;
    assert!(t >= Duration::from_millis(250), "closed after {t:?}");

    let mut partial = tokio::net::TcpStream::connect(gw.addr).await?;
    partial.write_all(b"GET / HTTP/1.1\r\nHo").await?;
    closed_after(&mut partial).await?;

    let mut body_missing = tokio::net::TcpStream::connect(gw.addr).await?;
    body_missing
        .write_all(
            format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 10\r\n\r\nabc")
                .as_bytes(),
        )
        .await?;
    closed_after(&mut body_missing).await?;

    // Served, then idle: closed. A slow instance (600 ms) is not held against the client.
    for (first, via) in [
        (
            format!("GET /slow?ms=600 HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            "own path",
        ),
        (
            format!(
                "POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
            ),
            "hyper",
        ),
    ] {
        let s = tokio::net::TcpStream::connect(gw.addr).await?;
        let mut r = tokio::io::BufReader::new(s);
        r.get_mut().write_all(first.as_bytes()).await?;
        let (status, _, _) = read_response(&mut r, false).await?;
        assert_eq!(status, 200, "{via}");
        closed_after(r.get_mut())
            .await
            .with_context(|| format!("idle after a response on {via}"))?;
    }
    Ok(())
}

/// A client that stops reading a response is dropped after the client timeout, and the
/// instance slot its request held goes to the next request.
#[tokio::test]
async fn a_client_that_stops_reading_frees_its_instance_slot() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let big = raw_instance("big", |head| {
        let body = if head.starts_with("GET /big") {
            "x".repeat(16 << 20)
        } else {
            "small".to_string()
        };
        (
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
            false,
        )
    })
    .await;
    let mut r = raw_rev(big);
    r.container_concurrency = 1;
    let gw = Gw::start_config(table(vec![one("big", r)]), short_client_timeout()).await;
    let mut stalled = tokio::net::TcpStream::connect(gw.addr).await?;
    let host = gw.host("big");
    stalled
        .write_all(format!("GET /big HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The only slot is taken by the stalled response until the gateway gives up on it.
    let start = Instant::now();
    let resp = gw.get("big", "/small").send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await?, "small");
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "served at once: the stalled response did not hold the slot"
    );
    Ok(())
}
