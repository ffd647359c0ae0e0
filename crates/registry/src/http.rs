//! The `/v2/` handlers. Repository names contain slashes, so one fallback handler parses the
//! path from its end (`…/manifests/<ref>`, `…/blobs/uploads/<id>`, …) and dispatches.

use crate::error::{Code, Error};
use crate::{Session, State};
use axum::body::Body;
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use ferry_api::image_ref::{is_valid_repository, is_valid_tag};
use ferry_oci::{Algorithm, Descriptor, Digest, Hasher, Manifest, media};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::io::{SeekFrom, Write};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

type Result<T> = std::result::Result<T, Error>;

const API_VERSION: &str = "registry/2.0";
/// Appends are written in pieces of this size, off the async threads.
const WRITE_CHUNK: usize = 1 << 20;

pub(crate) fn router(state: Arc<State>) -> axum::Router {
    axum::Router::new()
        .fallback(dispatch)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

enum Route<'a> {
    Base,
    Catalog,
    Token,
    Tags(&'a str),
    Manifest(&'a str, &'a str),
    UploadStart(&'a str),
    Upload(&'a str, &'a str),
    Blob(&'a str, &'a str),
    Referrers(&'a str, &'a str),
}

fn parse_route<'a>(path: &'a str) -> Option<Route<'a>> {
    if path == "/token" {
        return Some(Route::Token);
    }
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags(name));
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads")
        .or_else(|| rest.strip_suffix("/blobs/uploads/"))
    {
        return Some(Route::UploadStart(name));
    }
    if let Some(i) = rest.rfind("/blobs/uploads/") {
        return Some(Route::Upload(
            &rest[..i],
            &rest[i + "/blobs/uploads/".len()..],
        ));
    }
    for (marker, make) in [
        (
            "/manifests/",
            Route::Manifest as fn(&'a str, &'a str) -> Route<'a>,
        ),
        ("/blobs/", Route::Blob),
        ("/referrers/", Route::Referrers),
    ] {
        if let Some(i) = rest.rfind(marker) {
            let tail = &rest[i + marker.len()..];
            if !tail.is_empty() && !tail.contains('/') {
                return Some(make(&rest[..i], tail));
            }
        }
    }
    None
}

async fn dispatch(AxState(state): AxState<Arc<State>>, req: Request) -> Response {
    let mut resp = match handle(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static(API_VERSION),
    );
    resp
}

fn check_name(name: &str) -> Result<()> {
    if name.len() > 255 || !is_valid_repository(name) {
        return Err(Error::new(
            Code::NameInvalid,
            format!("invalid repository name {name:?}"),
        )
        .with_detail(serde_json::json!({ "name": name })));
    }
    Ok(())
}

fn parse_digest(s: &str) -> Result<Digest> {
    s.parse::<Digest>().map_err(|e| {
        Error::new(Code::DigestInvalid, e.to_string())
            .with_detail(serde_json::json!({ "digest": s }))
    })
}

fn query(req: &Request) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn unsupported(method: &Method) -> Error {
    Error::new(
        Code::Unsupported,
        format!("method {method} is not supported here"),
    )
}

async fn handle(state: &Arc<State>, req: Request) -> Result<Response> {
    let path = req.uri().path().to_string();
    let route = parse_route(&path)
        .ok_or_else(|| Error::new(Code::NameUnknown, format!("no such endpoint {path:?}")))?;
    if let Route::Token = route {
        return token(state, &req);
    }
    authorize(state, &req)?;
    let method = req.method().clone();
    match route {
        Route::Token => unreachable!("handled above"),
        Route::Base => match method {
            Method::GET | Method::HEAD => Ok(json_response(StatusCode::OK, &serde_json::json!({}))),
            m => Err(unsupported(&m)),
        },
        Route::Catalog => catalog(state, &method, query(&req)).await,
        Route::Tags(name) => {
            check_name(name)?;
            tags_list(state, name, &method, query(&req)).await
        }
        Route::Manifest(name, reference) => {
            check_name(name)?;
            match method {
                Method::GET | Method::HEAD => {
                    get_manifest(state, name, reference, method == Method::HEAD).await
                }
                Method::PUT => put_manifest(state, name, reference, req).await,
                Method::DELETE => delete_manifest(state, name, reference).await,
                m => Err(unsupported(&m)),
            }
        }
        Route::UploadStart(name) => {
            check_name(name)?;
            match method {
                Method::POST => start_upload(state, name, req).await,
                m => Err(unsupported(&m)),
            }
        }
        Route::Upload(name, id) => {
            check_name(name)?;
            match method {
                Method::GET => upload_status(state, name, id).await,
                Method::PATCH => patch_upload(state, name, id, req).await,
                Method::PUT => put_upload(state, name, id, req).await,
                Method::DELETE => cancel_upload(state, name, id).await,
                m => Err(unsupported(&m)),
            }
        }
        Route::Blob(name, digest) => {
            check_name(name)?;
            let digest = parse_digest(digest)?;
            match method {
                Method::GET | Method::HEAD => {
                    let range = req
                        .headers()
                        .get(header::RANGE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    get_blob(state, name, &digest, method == Method::HEAD, range).await
                }
                Method::DELETE => delete_blob(state, name, &digest).await,
                m => Err(unsupported(&m)),
            }
        }
        Route::Referrers(name, digest) => {
            check_name(name)?;
            let digest = parse_digest(digest)?;
            match method {
                Method::GET => referrers(state, name, &digest, query(&req)).await,
                m => Err(unsupported(&m)),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// auth

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let enc = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let dec = base64::engine::general_purpose::STANDARD
        .decode(enc.trim())
        .ok()?;
    let s = String::from_utf8(dec).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

fn users_match(state: &State, headers: &HeaderMap) -> bool {
    basic_credentials(headers).is_some_and(|(u, p)| {
        state
            .config
            .auth
            .users
            .get(&u)
            .is_some_and(|want| constant_eq(want, &p))
    })
}

fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

const TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(300);

fn authorize(state: &State, req: &Request) -> Result<()> {
    let auth = &state.config.auth;
    if auth.is_open() {
        return Ok(());
    }
    let headers = req.headers();
    if users_match(state, headers) {
        return Ok(());
    }
    if let Some(t) = bearer(headers) {
        if auth.tokens.iter().any(|k| constant_eq(k, t)) {
            return Ok(());
        }
        let issued = state.issued.lock().expect("issued tokens lock");
        if issued.get(t).is_some_and(|at| at.elapsed() < TOKEN_TTL) {
            return Ok(());
        }
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let challenge = if auth.users.is_empty() {
        "Bearer realm=\"ferry-registry\"".to_string()
    } else if auth.tokens.is_empty() {
        "Basic realm=\"ferry-registry\"".to_string()
    } else {
        format!("Bearer realm=\"http://{host}/token\",service=\"ferry-registry\"")
    };
    Err(Error::new(Code::Unauthorized, "authentication required")
        .with_header(header::WWW_AUTHENTICATE, &challenge))
}

/// The token endpoint of the bearer flow: basic credentials in, a short-lived token out.
fn token(state: &State, req: &Request) -> Result<Response> {
    if !users_match(state, req.headers()) {
        return Err(Error::new(
            Code::Unauthorized,
            "valid basic credentials required for a token",
        )
        .with_header(header::WWW_AUTHENTICATE, "Basic realm=\"ferry-registry\""));
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    let mut issued = state.issued.lock().expect("issued tokens lock");
    issued.retain(|_, at| at.elapsed() < TOKEN_TTL);
    issued.insert(token.clone(), std::time::Instant::now());
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "token": token, "access_token": token, "expires_in": TOKEN_TTL.as_secs() }),
    ))
}

// ---------------------------------------------------------------------------------------------
// helpers

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn empty(status: StatusCode, headers: &[(&str, String)]) -> Response {
    let mut resp = Response::builder().status(status);
    for (k, v) in headers {
        resp = resp.header(*k, v.as_str());
    }
    resp.header(header::CONTENT_LENGTH, "0")
        .body(Body::empty())
        .expect("valid response")
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// Pagination shared by tags and catalog: `n` (at most n entries) and `last` (after this one).
fn paginate(
    mut all: Vec<String>,
    q: &HashMap<String, String>,
    base: &str,
) -> Result<(Vec<String>, Option<String>)> {
    all.sort();
    if let Some(last) = q.get("last") {
        all.retain(|t| t.as_str() > last.as_str());
    }
    let Some(n) = q.get("n") else {
        return Ok((all, None));
    };
    let n: usize = n.parse().map_err(|_| {
        Error::new(
            Code::Unsupported,
            format!("query parameter n={n:?} is not a number"),
        )
    })?;
    if all.len() <= n {
        return Ok((all, None));
    }
    all.truncate(n);
    let link = all.last().map(|l| {
        let last: String = url::form_urlencoded::byte_serialize(l.as_bytes()).collect();
        format!("<{base}?n={n}&last={last}>; rel=\"next\"")
    });
    Ok((all, link))
}

async fn catalog(
    state: &Arc<State>,
    method: &Method,
    q: HashMap<String, String>,
) -> Result<Response> {
    if method != Method::GET {
        return Err(unsupported(method));
    }
    let st = state.clone();
    let all = blocking(move || Ok(st.store.repositories()?)).await?;
    let (repos, link) = paginate(all, &q, "/v2/_catalog")?;
    let mut resp = json_response(
        StatusCode::OK,
        &serde_json::json!({ "repositories": repos }),
    );
    if let Some(l) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LINK, l);
    }
    Ok(resp)
}

async fn tags_list(
    state: &Arc<State>,
    name: &str,
    method: &Method,
    q: HashMap<String, String>,
) -> Result<Response> {
    if method != Method::GET {
        return Err(unsupported(method));
    }
    let tags = state.store.tags(name)?.ok_or_else(|| {
        Error::new(
            Code::NameUnknown,
            format!("repository {name:?} is not known"),
        )
    })?;
    let (tags, link) = paginate(tags, &q, &format!("/v2/{name}/tags/list"))?;
    let mut resp = json_response(
        StatusCode::OK,
        &serde_json::json!({ "name": name, "tags": tags }),
    );
    if let Some(l) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LINK, l);
    }
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// manifests

fn manifest_unknown(name: &str, reference: &str) -> Error {
    Error::new(
        Code::ManifestUnknown,
        format!("manifest {reference:?} is not known in {name:?}"),
    )
}

fn resolve(state: &State, name: &str, reference: &str) -> Result<Option<Digest>> {
    if reference.contains(':') {
        return parse_digest(reference).map(Some);
    }
    if !is_valid_tag(reference) {
        return Err(Error::new(
            Code::TagInvalid,
            format!("invalid tag {reference:?}"),
        ));
    }
    Ok(state.store.resolve_tag(name, reference)?)
}

async fn get_manifest(
    state: &Arc<State>,
    name: &str,
    reference: &str,
    head: bool,
) -> Result<Response> {
    let digest =
        resolve(state, name, reference)?.ok_or_else(|| manifest_unknown(name, reference))?;
    let (media_type, body) = state
        .store
        .get_manifest(name, &digest)?
        .ok_or_else(|| manifest_unknown(name, reference))?;
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, media_type)
        .header("docker-content-digest", digest.to_string())
        .header(header::CONTENT_LENGTH, body.len().to_string())
        .header(header::ETAG, format!("\"{digest}\""));
    let body = if head {
        Body::empty()
    } else {
        Body::from(body)
    };
    Ok(resp.body(body).expect("valid response"))
}

async fn read_limited(req: Request, limit: usize) -> Result<Bytes> {
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large(limit as u64));
    }
    let body = http_body_util::Limited::new(req.into_body(), limit);
    match body.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit as u64)),
        Err(e) => Err(Error::new(
            Code::BlobUploadInvalid,
            format!("reading request body: {e}"),
        )),
    }
}

fn too_large(limit: u64) -> Error {
    Error::new(
        Code::PayloadTooLarge,
        format!("body exceeds the limit of {limit} bytes"),
    )
    .with_detail(serde_json::json!({ "limit": limit }))
}

async fn put_manifest(
    state: &Arc<State>,
    name: &str,
    reference: &str,
    req: Request,
) -> Result<Response> {
    let tag = if reference.contains(':') {
        None
    } else if is_valid_tag(reference) {
        Some(reference.to_string())
    } else {
        return Err(Error::new(
            Code::TagInvalid,
            format!("invalid tag {reference:?}"),
        ));
    };
    let pinned = if tag.is_none() {
        Some(parse_digest(reference)?)
    } else {
        None
    };
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = read_limited(req, state.config.max_manifest_bytes).await?;
    let manifest = Manifest::parse(&body, content_type.as_deref())
        .map_err(|e| Error::new(Code::ManifestInvalid, e.to_string()))?;
    let digest = match &pinned {
        Some(p) => {
            let actual = Digest::of(p.algorithm(), &body);
            if &actual != p {
                return Err(Error::new(
                    Code::DigestInvalid,
                    format!("manifest body has digest {actual}, not the {p} it was pushed as"),
                )
                .with_detail(serde_json::json!({ "digest": p.to_string() })));
            }
            actual
        }
        None => Digest::of(Algorithm::Sha256, &body),
    };
    let st = state.clone();
    let name_owned = name.to_string();
    let d = digest.clone();
    let m = manifest.clone();
    blocking(move || {
        let _guard = st.store.write_lock()?;
        for desc in m.blob_references() {
            if desc.urls.is_some() {
                continue; // non-distributable layer, fetched from its URLs
            }
            if st
                .store
                .blob_in_repository(&name_owned, &desc.digest)?
                .is_none()
            {
                return Err(Error::new(
                    Code::ManifestBlobUnknown,
                    format!(
                        "manifest references blob {} which is not in {name_owned:?}",
                        desc.digest
                    ),
                )
                .with_detail(serde_json::json!({ "digest": desc.digest.to_string() })));
            }
        }
        for desc in &m.manifests {
            if st.store.get_manifest(&name_owned, &desc.digest)?.is_none() {
                return Err(Error::new(
                    Code::ManifestBlobUnknown,
                    format!(
                        "index references manifest {} which is not in {name_owned:?}",
                        desc.digest
                    ),
                )
                .with_detail(serde_json::json!({ "digest": desc.digest.to_string() })));
            }
        }
        st.store
            .put_manifest(&name_owned, &d, &body, &m, tag.as_deref())?;
        Ok(())
    })
    .await?;
    tracing::debug!(repository = name, %digest, reference, "manifest stored");
    let mut headers = vec![
        ("location", format!("/v2/{name}/manifests/{digest}")),
        ("docker-content-digest", digest.to_string()),
    ];
    if let Some(s) = &manifest.subject {
        headers.push(("oci-subject", s.digest.to_string()));
    }
    Ok(empty(StatusCode::CREATED, &headers))
}

async fn delete_manifest(state: &Arc<State>, name: &str, reference: &str) -> Result<Response> {
    if !reference.contains(':') {
        if !is_valid_tag(reference) {
            return Err(Error::new(
                Code::TagInvalid,
                format!("invalid tag {reference:?}"),
            ));
        }
        return if state.store.delete_tag(name, reference)? {
            Ok(empty(StatusCode::ACCEPTED, &[]))
        } else {
            Err(manifest_unknown(name, reference))
        };
    }
    let digest = parse_digest(reference)?;
    let st = state.clone();
    let n = name.to_string();
    if blocking(move || Ok(st.store.delete_manifest(&n, &digest)?)).await? {
        Ok(empty(StatusCode::ACCEPTED, &[]))
    } else {
        Err(manifest_unknown(name, reference))
    }
}

async fn referrers(
    state: &Arc<State>,
    name: &str,
    subject: &Digest,
    q: HashMap<String, String>,
) -> Result<Response> {
    let mut list: Vec<Descriptor> = state.store.referrers(name, subject)?;
    let filtered = if let Some(at) = q.get("artifactType") {
        list.retain(|d| d.artifact_type.as_deref() == Some(at.as_str()));
        true
    } else {
        false
    };
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": list,
    });
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, media::OCI_INDEX)],
        body.to_string(),
    )
        .into_response();
    if filtered {
        resp.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// blobs

fn blob_unknown(name: &str, d: &Digest) -> Error {
    Error::new(
        Code::BlobUnknown,
        format!("blob {d} is not known in {name:?}"),
    )
    .with_detail(serde_json::json!({ "digest": d.to_string() }))
}

/// Parses `bytes=a-b`, `bytes=a-` and `bytes=-n` against a blob of `size`.
fn parse_range(v: &str, size: u64) -> Option<(u64, u64)> {
    let spec = v.strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            if n == 0 {
                return None;
            }
            (size.saturating_sub(n), size.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, size.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(size.checked_sub(1)?),
        ),
    };
    (start <= end && end < size).then_some((start, end))
}

async fn get_blob(
    state: &Arc<State>,
    name: &str,
    d: &Digest,
    head: bool,
    range: Option<String>,
) -> Result<Response> {
    let size = state
        .store
        .blob_in_repository(name, d)?
        .ok_or_else(|| blob_unknown(name, d))?;
    let (status, start, len) = match range {
        None => (StatusCode::OK, 0, size),
        Some(r) => match parse_range(&r, size) {
            Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
            None => {
                return Err(Error::new(
                    Code::RangeInvalid,
                    format!("range {r:?} cannot be satisfied for {size} bytes"),
                )
                .with_header(header::CONTENT_RANGE, &format!("bytes */{size}")));
            }
        },
    };
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", d.to_string())
        .header(header::CONTENT_LENGTH, len.to_string())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{d}\""));
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    if head {
        return Ok(resp.body(Body::empty()).expect("valid response"));
    }
    let path = state.store.blob_path(d);
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| blob_unknown(name, d))?;
    if start > 0 {
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| Error::new(Code::Internal, e.to_string()))?;
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 << 10);
    Ok(resp
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

async fn delete_blob(state: &Arc<State>, name: &str, d: &Digest) -> Result<Response> {
    if state.store.unlink_blob(name, d)? {
        Ok(empty(StatusCode::ACCEPTED, &[]))
    } else {
        Err(blob_unknown(name, d))
    }
}

// ---------------------------------------------------------------------------------------------
// uploads

fn upload_location(name: &str, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

fn range_header(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

fn upload_accepted(name: &str, id: &str, size: u64) -> Response {
    empty(
        StatusCode::ACCEPTED,
        &[
            ("location", upload_location(name, id)),
            ("range", range_header(size)),
            ("docker-upload-uuid", id.to_string()),
        ],
    )
}

fn blob_created(name: &str, d: &Digest) -> Response {
    empty(
        StatusCode::CREATED,
        &[
            ("location", format!("/v2/{name}/blobs/{d}")),
            ("docker-content-digest", d.to_string()),
        ],
    )
}

fn upload_unknown(id: &str) -> Error {
    Error::new(
        Code::BlobUploadUnknown,
        format!("upload {id:?} is not known"),
    )
}

async fn start_upload(state: &Arc<State>, name: &str, req: Request) -> Result<Response> {
    let q = query(&req);
    if let Some(mount) = q.get("mount") {
        let d = parse_digest(mount)?;
        let from = q.get("from").map(String::as_str);
        // Mount only from a repository that holds the blob (or any, when `from` is absent).
        let allowed = match from {
            Some(f) if is_valid_repository(f) => state.store.blob_in_repository(f, &d)?.is_some(),
            Some(_) => false,
            None => true,
        };
        if allowed && state.store.link_blob(name, &d)? {
            return Ok(blob_created(name, &d));
        }
        // Not mountable: fall through to a normal upload session, as the spec says.
    }
    {
        let sessions = state.sessions.lock().expect("sessions lock");
        if sessions.len() >= state.config.max_uploads {
            return Err(Error::new(
                Code::TooManyRequests,
                format!(
                    "too many open uploads ({}); finish or cancel some",
                    sessions.len()
                ),
            )
            .with_header(header::RETRY_AFTER, "1"));
        }
    }
    let id = state.store.create_upload(name)?;
    let session = Arc::new(tokio::sync::Mutex::new(Session {
        hasher: Some(Hasher::new(Algorithm::Sha256)),
        size: 0,
    }));
    state
        .sessions
        .lock()
        .expect("sessions lock")
        .insert(id.clone(), session.clone());
    if let Some(d) = q.get("digest") {
        // Monolithic single-request upload.
        let d = parse_digest(d)?;
        let mut s = session.lock().await;
        let r = async {
            append(state, &id, &mut s, req.into_body(), None).await?;
            commit(state, name, &id, &mut s, &d).await
        }
        .await;
        if r.is_err() {
            drop(s);
            forget(state, &id);
            let _ = state.store.delete_upload(&id);
        }
        r?;
        return Ok(blob_created(name, &d));
    }
    Ok(upload_accepted(name, &id, 0))
}

fn forget(state: &State, id: &str) {
    state.sessions.lock().expect("sessions lock").remove(id);
}

/// The session of upload `id` in repository `name`, reloaded from disk after a restart.
fn session(state: &State, name: &str, id: &str) -> Result<Arc<tokio::sync::Mutex<Session>>> {
    let on_disk = state
        .store
        .upload_state(id)?
        .ok_or_else(|| upload_unknown(id))?;
    if on_disk.repository != name {
        return Err(upload_unknown(id));
    }
    let mut sessions = state.sessions.lock().expect("sessions lock");
    Ok(sessions
        .entry(id.to_string())
        .or_insert_with(|| {
            Arc::new(tokio::sync::Mutex::new(Session {
                hasher: None,
                size: on_disk.size,
            }))
        })
        .clone())
}

async fn upload_status(state: &Arc<State>, name: &str, id: &str) -> Result<Response> {
    let s = session(state, name, id)?;
    let size = s.lock().await.size;
    Ok(empty(
        StatusCode::NO_CONTENT,
        &[
            ("location", upload_location(name, id)),
            ("range", range_header(size)),
            ("docker-upload-uuid", id.to_string()),
        ],
    ))
}

/// Parses a chunk's `Content-Range: <start>-<end>` (also `bytes <start>-<end>/<total>`).
fn content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("");
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    let s = s.split('/').next().unwrap_or("");
    let parsed = s
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
    match parsed {
        Some((a, b)) if a <= b => Ok(Some((a, b))),
        _ => Err(Error::new(
            Code::RangeInvalid,
            format!("malformed Content-Range {s:?}"),
        )),
    }
}

fn check_chunk_start(
    headers: &HeaderMap,
    size: u64,
    name: &str,
    id: &str,
) -> Result<Option<(u64, u64)>> {
    let range = content_range(headers)?;
    if let Some((start, _)) = range
        && start != size
    {
        return Err(Error::new(
            Code::RangeInvalid,
            format!("chunk starts at {start} but the upload holds {size} bytes"),
        )
        .with_header(header::LOCATION, &upload_location(name, id))
        .with_header(header::RANGE, &range_header(size)));
    }
    Ok(range)
}

async fn patch_upload(state: &Arc<State>, name: &str, id: &str, req: Request) -> Result<Response> {
    let s = session(state, name, id)?;
    let mut s = s.lock().await;
    let range = check_chunk_start(req.headers(), s.size, name, id)?;
    append(state, id, &mut s, req.into_body(), range).await?;
    Ok(upload_accepted(name, id, s.size))
}

async fn put_upload(state: &Arc<State>, name: &str, id: &str, req: Request) -> Result<Response> {
    let q = query(&req);
    let digest = q
        .get("digest")
        .ok_or_else(|| {
            Error::new(
                Code::DigestInvalid,
                "the digest query parameter is required to finish an upload",
            )
        })
        .and_then(|d| parse_digest(d))?;
    let s = session(state, name, id)?;
    let mut s = s.lock().await;
    let size = s.size;
    check_chunk_start(req.headers(), size, name, id)?;
    append(state, id, &mut s, req.into_body(), None).await?;
    match commit(state, name, id, &mut s, &digest).await {
        Ok(()) => {
            drop(s);
            forget(state, id);
            Ok(blob_created(name, &digest))
        }
        Err(e) => {
            if e.code == Code::DigestInvalid {
                drop(s);
                forget(state, id);
                let _ = state.store.delete_upload(id);
            }
            Err(e)
        }
    }
}

async fn cancel_upload(state: &Arc<State>, name: &str, id: &str) -> Result<Response> {
    let s = session(state, name, id)?;
    let _s = s.lock().await;
    forget(state, id);
    state.store.delete_upload(id)?;
    Ok(empty(StatusCode::NO_CONTENT, &[]))
}

/// Appends a request body to the upload's file, hashing as it goes; writes and hashing happen
/// off the async threads in pieces of [`WRITE_CHUNK`]. On a failed body the file is cut back to
/// what it held before, so a retried chunk starts clean. `announced` is the chunk's
/// Content-Range: a body of another length is refused (416) and rolled back the same way.
async fn append(
    state: &Arc<State>,
    id: &str,
    s: &mut Session,
    body: Body,
    announced: Option<(u64, u64)>,
) -> Result<()> {
    let before = s.size;
    let hasher_before = s.hasher.clone();
    let mut result = append_inner(state, id, s, body).await;
    if let (Ok(()), Some((a, b))) = (&result, announced)
        && s.size - before != b - a + 1
    {
        result = Err(Error::new(
            Code::RangeInvalid,
            format!(
                "Content-Range {a}-{b} announces {} bytes but the body had {}",
                b - a + 1,
                s.size - before
            ),
        ));
    }
    if result.is_err() {
        truncate(state, id, s, before).await?;
        s.hasher = hasher_before;
    }
    result
}

async fn append_inner(state: &Arc<State>, id: &str, s: &mut Session, body: Body) -> Result<()> {
    let p = state.store.upload_data(id);
    let limit = state.config.max_blob_bytes;
    let mut file = Some(
        blocking(move || {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&p)
                .map_err(|e| Error::new(Code::BlobUploadUnknown, format!("upload file: {e}")))
        })
        .await?,
    );
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::with_capacity(WRITE_CHUNK);
    loop {
        let next = stream.next().await;
        let done = next.is_none();
        if let Some(chunk) = next {
            let chunk = chunk.map_err(|e| {
                Error::new(Code::BlobUploadInvalid, format!("reading upload body: {e}"))
            })?;
            buf.extend_from_slice(&chunk);
            if let Some(max) = limit
                && s.size + buf.len() as u64 > max
            {
                return Err(too_large(max));
            }
        }
        if buf.len() >= WRITE_CHUNK || (done && !buf.is_empty()) {
            let data = buf.split().freeze();
            let n = data.len() as u64;
            let mut f = file.take().expect("file present between writes");
            let mut hasher = s.hasher.take();
            let offset = s.size;
            let (f, hasher) = blocking(move || {
                if let Some(h) = hasher.as_mut() {
                    h.update(&data);
                }
                f.write_all(&data)
                    .map_err(|e| Error::new(Code::Internal, format!("writing upload: {e}")))?;
                start_writeback(&f, offset, n);
                Ok((f, hasher))
            })
            .await?;
            file = Some(f);
            s.hasher = hasher;
            s.size += n;
        }
        if done {
            return Ok(());
        }
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` to disk now, without waiting:
/// the fsync when the upload is committed then has little left to write, and a blob's upload
/// does not end with one long flush of everything it wrote. Advisory: a failure is ignored
/// (the commit's fsync still decides).
fn start_writeback(f: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range reads no memory of ours; the descriptor is open for the call.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

async fn truncate(state: &Arc<State>, id: &str, s: &mut Session, len: u64) -> Result<()> {
    let p = state.store.upload_data(id);
    blocking(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(len))
            .map_err(|e| {
                Error::new(
                    Code::Internal,
                    format!("cutting upload {} back to {len} bytes: {e}", p.display()),
                )
            })
    })
    .await?;
    s.size = len;
    Ok(())
}

/// Verifies and installs the upload as blob `d` of `name`.
async fn commit(
    state: &Arc<State>,
    name: &str,
    id: &str,
    s: &mut Session,
    d: &Digest,
) -> Result<()> {
    let hashed = s.hasher.clone().map(Hasher::finish);
    let st = state.clone();
    let (id, name, d) = (id.to_string(), name.to_string(), d.clone());
    let committed = blocking(move || Ok(st.store.commit_upload(&id, &name, &d, hashed)?)).await?;
    if let Some(copy) = committed.duplicate {
        // The content was stored already: drop this copy after answering.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = std::fs::remove_file(&copy) {
                tracing::warn!(path = %copy.display(), error = %e, "removing a duplicate upload");
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_from_the_end() {
        assert!(matches!(parse_route("/v2/"), Some(Route::Base)));
        assert!(matches!(
            parse_route("/v2/a/b/tags/list"),
            Some(Route::Tags("a/b"))
        ));
        assert!(matches!(
            parse_route("/v2/a/manifests/v1"),
            Some(Route::Manifest("a", "v1"))
        ));
        assert!(matches!(
            parse_route("/v2/a/blobs/uploads/"),
            Some(Route::UploadStart("a"))
        ));
        assert!(matches!(
            parse_route("/v2/x/blobs/uploads/123"),
            Some(Route::Upload("x", "123"))
        ));
        assert!(matches!(
            parse_route("/v2/blobs/blobs/sha256:1"),
            Some(Route::Blob("blobs", "sha256:1"))
        ));
        assert!(matches!(
            parse_route("/v2/r/referrers/sha256:1"),
            Some(Route::Referrers("r", "sha256:1"))
        ));
        assert!(parse_route("/v3/").is_none());
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}
