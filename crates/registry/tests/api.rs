//! Every endpoint and error code of the registry, over real HTTP.

use ferry_oci::{Algorithm, Digest, media};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

struct Reg {
    base: String,
    http: Client,
    _dir: tempfile::TempDir,
    _stop: tokio_util::sync::DropGuard,
}

async fn start_with(f: impl FnOnce(&mut ferry_registry::Config)) -> Reg {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ferry_registry::Config::new(dir.path().join("reg"));
    f(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    tokio::spawn(ferry_registry::serve(listener, config, token.clone()));
    Reg {
        base: format!("http://{addr}"),
        http: Client::new(),
        _dir: dir,
        _stop: token.drop_guard(),
    }
}

async fn start() -> Reg {
    start_with(|_| {}).await
}

impl Reg {
    fn req(&self, m: Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        self.http.request(m, url)
    }

    /// The status of a bodyless request.
    async fn status(&self, m: Method, path: &str) -> StatusCode {
        self.req(m, path).send().await.unwrap().status()
    }

    /// The status and OCI error code of a bodyless request that must fail.
    async fn error(&self, m: Method, path: &str) -> (StatusCode, String) {
        error_code(self.req(m, path).send().await.unwrap()).await
    }

    /// Monolithic POST+PUT upload; returns the digest.
    async fn push_blob(&self, repo: &str, data: &[u8]) -> Digest {
        let d = Digest::sha256(data);
        let r = self
            .req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let r = self
            .req(Method::PUT, &format!("{loc}?digest={d}"))
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        d
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        mt: &str,
        body: &[u8],
    ) -> reqwest::Response {
        self.req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", mt)
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    }

    /// An image (config + one layer) pushed to `repo:tag`; returns (manifest digest, body).
    async fn push_image(&self, repo: &str, tag: &str, layer: &[u8]) -> (Digest, Vec<u8>) {
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        let cd = self.push_blob(repo, config).await;
        let ld = self.push_blob(repo, layer).await;
        let body = manifest(&cd, config.len(), &[(ld, layer.len())], None, None);
        let r = self
            .put_manifest(repo, tag, media::OCI_MANIFEST, &body)
            .await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        (Digest::sha256(&body), body)
    }
}

fn manifest(
    config: &Digest,
    config_size: usize,
    layers: &[(Digest, usize)],
    subject: Option<(&Digest, usize)>,
    artifact_type: Option<&str>,
) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": config.to_string(), "size": config_size},
        "layers": layers.iter().map(|(d, s)| json!({"mediaType": media::OCI_LAYER_GZIP, "digest": d.to_string(), "size": s})).collect::<Vec<_>>(),
    });
    if let Some((d, s)) = subject {
        m["subject"] =
            json!({"mediaType": media::OCI_MANIFEST, "digest": d.to_string(), "size": s});
    }
    if let Some(a) = artifact_type {
        m["artifactType"] = json!(a);
    }
    serde_json::to_vec(&m).unwrap()
}

async fn error_code(r: reqwest::Response) -> (StatusCode, String) {
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    (status, v["errors"][0]["code"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn base_and_version_header() {
    let reg = start().await;
    let r = reg.req(Method::GET, "/v2/").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
}

#[tokio::test]
async fn monolithic_and_single_post_uploads_and_pulls() {
    let reg = start().await;
    let d = reg.push_blob("a/b", b"hello world").await;
    // HEAD and GET by digest.
    let r = reg
        .req(Method::HEAD, &format!("/v2/a/b/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-length"], "11");
    assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());
    let r = reg
        .req(Method::GET, &format!("/v2/a/b/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"hello world");
    // Range reads.
    let r = reg
        .req(Method::GET, &format!("/v2/a/b/blobs/{d}"))
        .header("range", "bytes=6-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], "bytes 6-10/11");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"world");
    let r = reg
        .req(Method::GET, &format!("/v2/a/b/blobs/{d}"))
        .header("range", "bytes=50-60")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    // Single POST with digest.
    let data = b"single post";
    let d2 = Digest::sha256(data);
    let r = reg
        .req(Method::POST, &format!("/v2/a/b/blobs/uploads/?digest={d2}"))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        r.headers()["location"],
        format!("/v2/a/b/blobs/{d2}").as_str()
    );

    // sha512 blobs.
    let d3 = Digest::of(Algorithm::Sha512, b"five twelve");
    let r = reg
        .req(Method::POST, &format!("/v2/a/b/blobs/uploads/?digest={d3}"))
        .body(&b"five twelve"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = reg
        .req(Method::GET, &format!("/v2/a/b/blobs/{d3}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"five twelve");

    // Unknown blob, blob of another repository.
    let (s, c) = error_code(
        reg.req(
            Method::GET,
            &format!("/v2/a/b/blobs/{}", Digest::sha256(b"nope")),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"));
    let (s, c) = reg
        .error(Method::GET, &format!("/v2/other/blobs/{d}"))
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"));
}

#[tokio::test]
async fn chunked_upload_with_status_and_out_of_order_416() {
    let reg = start().await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let d = Digest::sha256(&data);
    let r = reg
        .req(Method::POST, "/v2/chunky/blobs/uploads/")
        .send()
        .await
        .unwrap();
    let mut loc = r.headers()["location"].to_str().unwrap().to_string();
    let id = r.headers()["docker-upload-uuid"]
        .to_str()
        .unwrap()
        .to_string();
    let mut at = 0usize;
    for chunk in data.chunks(100_000).take(2) {
        let end = at + chunk.len() - 1;
        let r = reg
            .req(Method::PATCH, &loc)
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{at}-{end}"))
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        assert_eq!(r.headers()["range"], format!("0-{end}").as_str());
        loc = r.headers()["location"].to_str().unwrap().to_string();
        at = end + 1;
    }
    // Status.
    let r = reg
        .req(Method::GET, &format!("/v2/chunky/blobs/uploads/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["range"], "0-199999");
    // A chunk out of order is refused and changes nothing.
    let r = reg
        .req(Method::PATCH, &loc)
        .header("content-range", "250000-299999")
        .body(data[250_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    // A Content-Range that announces more than the body holds is refused and rolled back.
    let r = reg
        .req(Method::PATCH, &loc)
        .header("content-range", "200000-299999")
        .body(data[200_000..250_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let r = reg
        .req(Method::GET, &format!("/v2/chunky/blobs/uploads/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["range"], "0-199999");
    // The last chunk with the closing PUT.
    let r = reg
        .req(Method::PUT, &format!("{loc}?digest={d}"))
        .header("content-range", "200000-299999")
        .body(data[200_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = reg
        .req(Method::GET, &format!("/v2/chunky/blobs/{d}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.as_ref(), &data[..]);
    // The session is gone.
    let (s, c) = reg
        .error(Method::GET, &format!("/v2/chunky/blobs/uploads/{id}"))
        .await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    );
}

#[tokio::test]
async fn upload_errors_wrong_digest_missing_digest_cancel() {
    let reg = start().await;
    let r = reg
        .req(Method::POST, "/v2/e/blobs/uploads/")
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let (s, c) = error_code(
        reg.req(Method::PUT, &loc)
            .body(&b"x"[..])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, c.as_str()), (StatusCode::BAD_REQUEST, "DIGEST_INVALID"));
    let (s, c) = reg
        .error(Method::PUT, &format!("{loc}?digest=sha256:1234"))
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::BAD_REQUEST, "DIGEST_INVALID"));
    let wrong = Digest::sha256(b"something else");
    let (s, c) = error_code(
        reg.req(Method::PUT, &format!("{loc}?digest={wrong}"))
            .body(&b"data"[..])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, c.as_str()), (StatusCode::BAD_REQUEST, "DIGEST_INVALID"));
    let (s, _) = reg
        .error(Method::GET, &format!("/v2/e/blobs/{wrong}"))
        .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "a blob that failed verification is never visible"
    );

    let r = reg
        .req(Method::POST, "/v2/e/blobs/uploads/")
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(
        reg.status(Method::DELETE, &loc).await,
        StatusCode::NO_CONTENT
    );
    let (s, c) = error_code(
        reg.req(Method::PATCH, &loc)
            .body(&b"x"[..])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    );
    let (s, c) = reg
        .error(Method::GET, "/v2/e/blobs/uploads/not-a-uuid")
        .await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    );
}

#[tokio::test]
async fn names_tags_and_methods_are_validated() {
    let reg = start().await;
    for bad in ["UPPER", "a//b", "-a", "a..b", &"x".repeat(256)] {
        let (s, c) = reg
            .error(Method::GET, &format!("/v2/{bad}/tags/list"))
            .await;
        assert_eq!(
            (s, c.as_str()),
            (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            "{bad}"
        );
    }
    let (s, c) = reg.error(Method::GET, "/v2/missing/tags/list").await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "NAME_UNKNOWN"));
    let (s, c) = error_code(
        reg.put_manifest("r", "bad!tag", media::OCI_MANIFEST, b"{}")
            .await,
    )
    .await;
    assert_eq!((s, c.as_str()), (StatusCode::BAD_REQUEST, "TAG_INVALID"));
    let (s, c) = reg.error(Method::PATCH, "/v2/r/manifests/v1").await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")
    );
}

#[tokio::test]
async fn manifests_push_pull_validate_delete() {
    let reg = start().await;
    let (md, body) = reg.push_image("app", "v1", b"layer-1").await;
    for reference in ["v1".to_string(), md.to_string()] {
        let r = reg
            .req(Method::GET, &format!("/v2/app/manifests/{reference}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], media::OCI_MANIFEST);
        assert_eq!(
            r.headers()["docker-content-digest"],
            md.to_string().as_str()
        );
        assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
        let r = reg
            .req(Method::HEAD, &format!("/v2/app/manifests/{reference}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()["content-length"],
            body.len().to_string().as_str()
        );
    }
    // Malformed manifests.
    for bad in [
        &b"not json"[..],
        br#"{"schemaVersion":1}"#,
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
    ] {
        let (s, c) = error_code(
            reg.put_manifest("app", "bad", media::OCI_MANIFEST, bad)
                .await,
        )
        .await;
        assert_eq!(
            (s, c.as_str()),
            (StatusCode::BAD_REQUEST, "MANIFEST_INVALID")
        );
    }
    // References a blob the repository does not have.
    let ghost = Digest::sha256(b"ghost");
    let cfg = reg.push_blob("app", b"{}").await;
    let m = manifest(&cfg, 2, &[(ghost.clone(), 5)], None, None);
    let r = reg
        .put_manifest("app", "ghost", media::OCI_MANIFEST, &m)
        .await;
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(v["errors"][0]["detail"]["digest"], ghost.to_string());
    // Pushed by digest with a body of another digest.
    let (s, c) = error_code(
        reg.put_manifest(
            "app",
            &Digest::sha256(b"x").to_string(),
            media::OCI_MANIFEST,
            &body,
        )
        .await,
    )
    .await;
    assert_eq!((s, c.as_str()), (StatusCode::BAD_REQUEST, "DIGEST_INVALID"));
    // Pushed by its sha512 digest.
    let d512 = Digest::of(Algorithm::Sha512, &body);
    let r = reg
        .put_manifest("app", &d512.to_string(), media::OCI_MANIFEST, &body)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        reg.status(Method::GET, &format!("/v2/app/manifests/{d512}"))
            .await,
        StatusCode::OK
    );
    // Unknown manifest.
    let (s, c) = reg.error(Method::GET, "/v2/app/manifests/nope").await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"));

    // Delete a tag, then the manifest.
    reg.put_manifest("app", "v2", media::OCI_MANIFEST, &body)
        .await;
    assert_eq!(
        reg.status(Method::DELETE, "/v2/app/manifests/v2").await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        reg.status(Method::GET, "/v2/app/manifests/v2").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        reg.status(Method::GET, "/v2/app/manifests/v1").await,
        StatusCode::OK
    );
    assert_eq!(
        reg.status(Method::DELETE, &format!("/v2/app/manifests/{md}"))
            .await,
        StatusCode::ACCEPTED
    );
    let (s, c) = reg
        .error(Method::GET, &format!("/v2/app/manifests/{md}"))
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"));
    assert_eq!(
        reg.status(Method::GET, "/v2/app/manifests/v1").await,
        StatusCode::NOT_FOUND
    );
    let (s, c) = reg
        .error(Method::DELETE, &format!("/v2/app/manifests/{md}"))
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"));
    // Delete a blob.
    assert_eq!(
        reg.status(Method::DELETE, &format!("/v2/app/blobs/{cfg}"))
            .await,
        StatusCode::ACCEPTED
    );
    let (s, c) = reg
        .error(Method::DELETE, &format!("/v2/app/blobs/{cfg}"))
        .await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"));
}

#[tokio::test]
async fn docker_media_types_and_index() {
    let reg = start().await;
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let cd = reg.push_blob("multi", config).await;
    let ld = reg.push_blob("multi", b"l").await;
    let docker = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": media::DOCKER_MANIFEST,
        "config": {"mediaType": media::DOCKER_CONFIG, "digest": cd.to_string(), "size": config.len()},
        "layers": [{"mediaType": media::DOCKER_LAYER_GZIP, "digest": ld.to_string(), "size": 1}],
    })).unwrap();
    let dd = Digest::sha256(&docker);
    assert_eq!(
        reg.put_manifest("multi", &dd.to_string(), media::DOCKER_MANIFEST, &docker)
            .await
            .status(),
        StatusCode::CREATED
    );
    let (od, obody) = reg.push_image("multi", "arm", b"arm-layer").await;
    let list = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": media::DOCKER_MANIFEST_LIST,
        "manifests": [
            {"mediaType": media::DOCKER_MANIFEST, "digest": dd.to_string(), "size": docker.len(), "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": media::OCI_MANIFEST, "digest": od.to_string(), "size": obody.len(), "platform": {"architecture": "arm64", "os": "linux"}},
        ],
    })).unwrap();
    let r = reg
        .put_manifest("multi", "latest", media::DOCKER_MANIFEST_LIST, &list)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = reg
        .req(Method::GET, "/v2/multi/manifests/latest")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], media::DOCKER_MANIFEST_LIST);
    // An index naming a manifest the repository lacks is refused.
    let bad = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": media::OCI_INDEX,
        "manifests": [{"mediaType": media::OCI_MANIFEST, "digest": Digest::sha256(b"none").to_string(), "size": 1}],
    })).unwrap();
    let (s, c) = error_code(
        reg.put_manifest("multi", "bad", media::OCI_INDEX, &bad)
            .await,
    )
    .await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN")
    );

    // The client resolves the index to this node's platform.
    let host = reg.base.trim_start_matches("http://");
    let image: ferry_api::ImageRef = format!("{host}/multi:latest").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = ferry_oci::layout::Layout::create(dir.path()).unwrap();
    let client = ferry_oci::client::Client::new(None);
    let amd = ferry_oci::Platform {
        architecture: "amd64".into(),
        os: "linux".into(),
        variant: None,
        os_version: None,
    };
    let pulled = client.pull(&image, &amd, &layout).await.unwrap();
    assert_eq!(pulled.manifest.digest, dd);
    assert_eq!(pulled.digest, Digest::sha256(&list));
    assert!(layout.has_blob(&ld));
}

#[tokio::test]
async fn tags_and_catalog_paginate() {
    let reg = start().await;
    let (md, body) = reg.push_image("pages", "a", b"x").await;
    for t in ["d", "c", "b", "e"] {
        assert_eq!(
            reg.put_manifest("pages", t, media::OCI_MANIFEST, &body)
                .await
                .status(),
            StatusCode::CREATED
        );
    }
    let _ = md;
    let v: Value = reg
        .req(Method::GET, "/v2/pages/tags/list")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v,
        json!({"name": "pages", "tags": ["a", "b", "c", "d", "e"]})
    );
    let r = reg
        .req(Method::GET, "/v2/pages/tags/list?n=2")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["link"],
        "</v2/pages/tags/list?n=2&last=b>; rel=\"next\""
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!(["a", "b"]));
    let v: Value = reg
        .req(Method::GET, "/v2/pages/tags/list?n=2&last=b")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], json!(["c", "d"]));
    let v: Value = reg
        .req(Method::GET, "/v2/pages/tags/list?last=d")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], json!(["e"]));
    let v: Value = reg
        .req(Method::GET, "/v2/pages/tags/list?n=0")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], json!([]));

    reg.push_blob("zeta/one", b"1").await;
    reg.push_blob("alpha", b"2").await;
    let v: Value = reg
        .req(Method::GET, "/v2/_catalog")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["repositories"], json!(["alpha", "pages", "zeta/one"]));
    let v: Value = reg
        .req(Method::GET, "/v2/_catalog?n=1&last=alpha")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["repositories"], json!(["pages"]));
}

#[tokio::test]
async fn referrers_with_subject_and_artifact_type_filter() {
    let reg = start().await;
    let (subject, sbody) = reg.push_image("sig", "v1", b"payload").await;
    let empty = reg.push_blob("sig", b"{}").await;
    let mut referrers = Vec::new();
    for (i, at) in [
        "application/vnd.example.sbom",
        "application/vnd.example.signature",
    ]
    .iter()
    .enumerate()
    {
        let layer = reg
            .push_blob("sig", format!("artifact {i}").as_bytes())
            .await;
        let m = manifest(
            &empty,
            2,
            &[(layer, 10)],
            Some((&subject, sbody.len())),
            Some(at),
        );
        let r = reg
            .put_manifest(
                "sig",
                &Digest::sha256(&m).to_string(),
                media::OCI_MANIFEST,
                &m,
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()["oci-subject"], subject.to_string().as_str());
        referrers.push(Digest::sha256(&m));
    }
    let r = reg
        .req(Method::GET, &format!("/v2/sig/referrers/{subject}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], media::OCI_INDEX);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
    let r = reg
        .req(
            Method::GET,
            &format!("/v2/sig/referrers/{subject}?artifactType=application/vnd.example.sbom"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.sbom"
    );
    // Deleting a referrer removes it from the list.
    reg.req(
        Method::DELETE,
        &format!("/v2/sig/manifests/{}", referrers[0]),
    )
    .send()
    .await
    .unwrap();
    let v: Value = reg
        .req(Method::GET, &format!("/v2/sig/referrers/{subject}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    // No referrers: an empty index, not a 404.
    let v: Value = reg
        .req(
            Method::GET,
            &format!("/v2/sig/referrers/{}", Digest::sha256(b"q")),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["manifests"], json!([]));
    let (s, c) = reg.error(Method::GET, "/v2/sig/referrers/sha256:xyz").await;
    assert_eq!((s, c.as_str()), (StatusCode::BAD_REQUEST, "DIGEST_INVALID"));
}

#[tokio::test]
async fn uploading_stored_content_to_another_repository() {
    let reg = start().await;
    let data = vec![7u8; 3 << 20];
    let d = reg.push_blob("a", &data).await;
    // The same bytes uploaded (not mounted) into another repository: accepted, served there,
    // and the second copy does not stay on disk.
    assert_eq!(reg.push_blob("b", &data).await, d);
    let r = reg
        .req(Method::GET, &format!("/v2/b/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());
    assert_eq!(
        reg.status(Method::HEAD, &format!("/v2/a/blobs/{d}")).await,
        StatusCode::OK
    );
    let root = reg._dir.path().join("reg");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let staged = std::fs::read_dir(root.join("tmp")).unwrap().count();
        let uploads = std::fs::read_dir(root.join("uploads")).unwrap().count();
        if staged == 0 && uploads == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{staged} staged files and {uploads} uploads left"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn cross_repository_mount() {
    let reg = start().await;
    let d = reg.push_blob("src", b"shared layer").await;
    let r = reg
        .req(
            Method::POST,
            &format!("/v2/dst/blobs/uploads/?mount={d}&from=src"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        r.headers()["location"],
        format!("/v2/dst/blobs/{d}").as_str()
    );
    assert_eq!(
        reg.status(Method::GET, &format!("/v2/dst/blobs/{d}")).await,
        StatusCode::OK
    );
    // Unknown blob: falls back to an upload session.
    let r = reg
        .req(
            Method::POST,
            &format!(
                "/v2/dst/blobs/uploads/?mount={}&from=src",
                Digest::sha256(b"z")
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn size_limits_and_too_many_uploads() {
    let reg = start_with(|c| {
        c.max_manifest_bytes = 1024;
        c.max_blob_bytes = Some(1000);
        c.max_uploads = 2;
    })
    .await;
    let (s, c) = error_code(
        reg.put_manifest("big", "v1", media::OCI_MANIFEST, &vec![b' '; 2048])
            .await,
    )
    .await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID")
    );
    let data = vec![7u8; 5000];
    let d = Digest::sha256(&data);
    let (s, c) = error_code(
        reg.req(Method::POST, &format!("/v2/big/blobs/uploads/?digest={d}"))
            .body(data)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID")
    );
    assert_eq!(
        reg.status(Method::POST, "/v2/big/blobs/uploads/").await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        reg.status(Method::POST, "/v2/big/blobs/uploads/").await,
        StatusCode::ACCEPTED
    );
    let r = reg
        .req(Method::POST, "/v2/big/blobs/uploads/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    let (s, c) = error_code(r).await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_REQUESTS")
    );
}

#[tokio::test]
async fn basic_and_bearer_auth() {
    let reg = start_with(|c| {
        c.auth.users.insert("alice".into(), "s3cret".into());
        c.auth.tokens.push("static-token".into());
    })
    .await;
    let r = reg.req(Method::GET, "/v2/").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer realm=")
    );
    let (_, c) = error_code(r).await;
    assert_eq!(c, "UNAUTHORIZED");
    assert_eq!(
        reg.req(Method::GET, "/v2/")
            .basic_auth("alice", Some("wrong"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        reg.req(Method::GET, "/v2/")
            .basic_auth("alice", Some("s3cret"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        reg.req(Method::GET, "/v2/")
            .bearer_auth("static-token")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let v: Value = reg
        .req(Method::GET, "/token")
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t = v["token"].as_str().unwrap();
    assert_eq!(
        reg.req(Method::GET, "/v2/")
            .bearer_auth(t)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        reg.status(Method::GET, "/token").await,
        StatusCode::UNAUTHORIZED
    );

    // The client follows the bearer challenge with basic credentials.
    let host = reg.base.trim_start_matches("http://");
    let image: ferry_api::ImageRef = format!("{host}/x:v1").parse().unwrap();
    let client = ferry_oci::client::Client::new(Some(ferry_oci::client::Credentials::Basic {
        username: "alice".into(),
        password: "s3cret".into(),
    }));
    let err = client.resolve(&image).await.unwrap_err();
    assert!(
        matches!(err, ferry_oci::client::ClientError::NotFound(_)),
        "{err}"
    );
}

#[tokio::test]
async fn gc_removes_only_unreferenced_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("reg");
    let reg = start_with(|c| c.root = root.clone()).await;
    let (_, body) = reg.push_image("keep", "v1", b"kept layer").await;
    let orphan = reg.push_blob("keep", b"orphan").await;
    let report = ferry_registry::gc(&root, std::time::Duration::ZERO).unwrap();
    assert_eq!(report.blobs_deleted, 1);
    assert_eq!(
        reg.status(Method::GET, &format!("/v2/keep/blobs/{orphan}"))
            .await,
        StatusCode::NOT_FOUND
    );
    let r = reg
        .req(Method::GET, "/v2/keep/manifests/v1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    // Young blobs survive a gc with a grace period.
    let young = reg.push_blob("keep", b"young").await;
    ferry_registry::gc(&root, std::time::Duration::from_secs(3600)).unwrap();
    assert_eq!(
        reg.status(Method::GET, &format!("/v2/keep/blobs/{young}"))
            .await,
        StatusCode::OK
    );
}
