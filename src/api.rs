//! The public HTTP API (DESIGN.md section 2). Handlers parse and validate requests, call the
//! node, and map errors to statuses in one place ([`ApiError`]).

use crate::auth::{Caller, Perm};
use crate::ingest::{self, IngestError, Precision};
use crate::model::MetricKey;
use crate::node::{Node, NodeError, QueryOutcome, QueryRequest};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// An error answer: `{"error": "..."}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        // A body refused as too large may be unread, and the connection then cannot carry
        // another request: saying so keeps a client from sending its next one there (hyper
        // closes it either way, and a client that reused it got a broken answer).
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            response.headers_mut().insert(header::CONNECTION, axum::http::HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let status = match &e {
            NodeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            NodeError::NotFound(_) => StatusCode::NOT_FOUND,
            NodeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            NodeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            NodeError::Dropped(_) => StatusCode::CONFLICT,
            NodeError::StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            NodeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self { status, message: e.to_string() }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Invalid(m) => ApiError::bad(m),
            IngestError::TooMany { max } => ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!("the batch has more than {max} points (shoal.write.max-batch-points)"),
            },
        }
    }
}

fn body(node: &Node, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => body_too_large(node),
        status => ApiError { status, message: format!("cannot read the request body: {rejection}") },
    })
}

fn body_too_large(node: &Node) -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!(
            "the request body is larger than {} bytes (shoal.http.max-body)",
            node.cfg.http_body_bytes_max
        ),
    }
}

/// The body of a write, read into one buffer sized by its `Content-Length` (within
/// `shoal.http.max-body`). axum's `Bytes` gathers the chunks and then copies them into one
/// buffer: a second copy of a 6 MB body of 100,000 lines alive at once, and a twentieth of a
/// load's CPU in the copy.
struct WriteBody(Bytes);

impl axum::extract::FromRequest<Arc<Node>> for WriteBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, node: &Arc<Node>) -> Result<Self, ApiError> {
        use futures_util::StreamExt;
        let limit = node.cfg.http_body_bytes_max;
        let expected = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if expected.is_some_and(|len| len > limit) {
            return Err(body_too_large(node));
        }
        let mut out = Vec::with_capacity(expected.unwrap_or(0));
        let mut chunks = req.into_body().into_data_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad(format!("cannot read the request body: {e}")))?;
            if out.len() + chunk.len() > limit {
                return Err(body_too_large(node));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Self(out.into()))
    }
}

pub fn router(node: Arc<Node>) -> Router {
    let body_limit = node.cfg.http_body_bytes_max;
    Router::new()
        .route("/", get(index))
        .route("/data", post(post_data))
        .route("/write", post(post_write))
        .route("/ping", get(ping).head(ping))
        .route("/api/v1/write", post(remote_write))
        .route("/query", get(get_query).post(post_query))
        .route("/commands/dbs", get(list_dbs))
        .route("/commands/{db}/namespaces", get(list_namespaces))
        .route("/commands/{db}/{ns}/metrics", get(list_metrics))
        .route("/commands/{db}/{ns}/{metric}", get(describe_metric).delete(drop_metric))
        .route("/status", get(status))
        .route("/cluster/members", get(cluster_members))
        .route("/cluster/leave", post(cluster_leave))
        .route("/cluster/shards", get(cluster_shards))
        .route("/cluster/keyring", get(cluster_keyring).post(change_keyring))
        .merge(internal_routes(node.clone()))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/ui", get(ui_page))
        .route("/metrics", get(prometheus))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(node.clone(), authenticate))
        .layer(middleware::from_fn_with_state(node.clone(), request_timeout))
        .layer(middleware::from_fn_with_state(node.clone(), count_requests))
        .with_state(node)
}

/// The internal API (between nodes): every request must name our cluster and, when the
/// cluster has a secret, be signed with a key of our keyring ([`internal_guard`]).
fn internal_routes(node: Arc<Node>) -> Router<Arc<Node>> {
    let large = || DefaultBodyLimit::max(crate::catalog::STATE_BYTES_MAX);
    Router::new()
        .route("/internal/v1/write", post(internal_write).layer(large()))
        .route("/internal/v1/merge", post(internal_merge).layer(large()))
        .route("/internal/v1/digests", post(internal_digests))
        .route("/internal/v1/points", post(internal_points))
        .route("/internal/v1/partial", post(internal_partial))
        .route("/internal/v1/revoke", post(internal_revoke))
        .route("/internal/v1/delete", post(internal_delete))
        .route("/internal/v1/tombstones", post(internal_tombstones))
        .route("/internal/v1/status", get(internal_status))
        .route("/internal/v1/keyring", post(internal_keyring))
        .route("/internal/v1/catalog", post(internal_catalog_push).layer(large()))
        .route("/internal/v1/catalog/diff", post(internal_catalog_diff).layer(large()))
        .route_layer(middleware::from_fn_with_state(node, internal_guard))
}

/// Refuses an internal request of another cluster (403) or, with a cluster secret, one that
/// is not signed with a key of our keyring (401). The body is read here to check the
/// signature, within the largest internal body.
async fn internal_guard(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    if let Err(e) = check_cluster(&node, &parts.headers) {
        return e.into_response();
    }
    let Some(keyring) = &node.keyring else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    let bytes = match axum::body::to_bytes(body, crate::catalog::STATE_BYTES_MAX).await {
        Ok(bytes) => bytes,
        Err(e) => return ApiError::bad(format!("cannot read the request body: {e}")).into_response(),
    };
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(String::from);
    let now_ms = node.env.clock.now_ms();
    if let Err(why) = keyring.verify(parts.method.as_str(), parts.uri.path(), header, &bytes, now_ms) {
        keyring.rejected.fetch_add(1, Relaxed);
        return ApiError { status: StatusCode::UNAUTHORIZED, message: why }.into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// The permission a public route needs that its path or query names; routes that name their
/// db in the body (`/data`, `/query`) check in their handler, the rest need only a known user.
fn route_permission(
    method: &axum::http::Method,
    path: &str,
    query: &HashMap<String, String>,
) -> Option<(String, Perm)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        (_, ["cluster", "leave" | "keyring"]) => Some((crate::auth::ALL_DBS.into(), Perm::Admin)),
        ("POST", ["write"]) => query.get("db").map(|db| (db.clone(), Perm::Write)),
        ("DELETE", ["commands", db, ..]) => Some((db.to_string(), Perm::Admin)),
        (_, ["commands", db, ..]) if *db != "dbs" => Some((db.to_string(), Perm::Read)),
        _ => None,
    }
}

/// With a users file, every public request but the probes must carry a known user's
/// credentials (401 otherwise) and the permission its route needs (403); the caller goes on to
/// the handler as an extension. The internal API has its own guard ([`internal_guard`]).
async fn authenticate(State(node): State<Arc<Node>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = matches!(path, "/livez" | "/readyz" | "/ping") || path.starts_with("/internal/");
    let caller = match &node.users {
        Some(users) if !open => {
            let query = Query::<HashMap<String, String>>::try_from_uri(req.uri()).map(|q| q.0).unwrap_or_default();
            let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            let refuse = |status: StatusCode, message: String| {
                node.metrics.auth_refused.fetch_add(1, Relaxed);
                let mut response = ApiError { status, message }.into_response();
                if status == StatusCode::UNAUTHORIZED {
                    response
                        .headers_mut()
                        .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"shoal\""));
                }
                response
            };
            let caller = match crate::auth::credentials(authorization, &query) {
                Ok(Some((user, password))) => users.authenticate(&user, &password).await,
                Ok(None) => Err(crate::auth::AuthError::Missing),
                Err(e) => Err(e),
            };
            let caller = match caller {
                Ok(caller) => caller,
                Err(e) => return refuse(StatusCode::UNAUTHORIZED, e.to_string()),
            };
            if let Some((db, perm)) = route_permission(req.method(), path, &query)
                && let Err(message) = caller.require(&db, perm)
            {
                return refuse(StatusCode::FORBIDDEN, message);
            }
            caller
        }
        _ => Caller::anyone(),
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// A 403 for a handler's own permission check.
fn forbidden(node: &Node, message: String) -> ApiError {
    node.metrics.auth_refused.fetch_add(1, Relaxed);
    ApiError { status: StatusCode::FORBIDDEN, message }
}

/// A request (reading its body included) that does not complete within
/// `shoal.http.request-timeout` is answered 408: a client trickling a body cannot hold a task
/// and its buffers for ever. A write cut off this way may be partly stored; points are a set,
/// so the client's retry is harmless.
async fn request_timeout(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let limit = node.cfg.http_request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("the request did not complete within {limit:?} (shoal.http.request-timeout)"),
        }
        .into_response(),
    }
}

async fn count_requests(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    node.metrics.http_requests.fetch_add(1, Relaxed);
    let route = crate::metrics::route_of(req.uri().path());
    let started = tokio::time::Instant::now();
    let response = next.run(req).await;
    node.metrics.request_seconds[route].observe(started.elapsed());
    if response.status().is_client_error() {
        node.metrics.http_client_errors.fetch_add(1, Relaxed);
    } else if response.status().is_server_error() {
        node.metrics.http_server_errors.fetch_add(1, Relaxed);
    }
    response
}

/// The `?consistency=one|quorum|all` of a write, if given.
fn consistency(params: &HashMap<String, String>) -> Result<Option<crate::config::Consistency>, ApiError> {
    match params.get("consistency") {
        None => Ok(None),
        Some(c) => crate::config::Consistency::parse(c)
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("consistency {c:?} is not one of one, quorum, all"))),
    }
}

async fn post_data(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
    WriteBody(raw): WriteBody,
) -> Result<Json<serde_json::Value>, ApiError> {
    let consistency = consistency(&params)?;
    let batch = ingest::parse_nsdb_json(&raw, node.env.clock.now_ms(), node.cfg.write_batch_points_max)?;
    // The body is not needed while the batch is made durable (see `post_write`).
    drop(raw);
    let dbs: BTreeSet<&str> = batch.metrics.iter().map(|(key, _)| key.db.as_str()).collect();
    for db in dbs {
        caller.require(db, Perm::Write).map_err(|m| forbidden(&node, m))?;
    }
    let points = node.ingest(batch, consistency).await?;
    Ok(Json(serde_json::json!({ "points": points })))
}

/// The InfluxDB version Influx clients are told (`X-Influxdb-Version`): the 1.x API Shoal
/// speaks.
pub const INFLUXDB_VERSION: &str = "1.8.10";

/// `GET|HEAD /ping`: InfluxDB's liveness probe (204 with its version headers); with
/// `?verbose=true`, 200 and the version as JSON. Open without credentials, as in InfluxDB.
async fn ping(Query(params): Query<HashMap<String, String>>) -> Response {
    let headers = [("x-influxdb-version", INFLUXDB_VERSION), ("x-influxdb-build", "OSS")];
    if params.get("verbose").is_some_and(|v| v == "true") {
        (headers, Json(serde_json::json!({ "version": INFLUXDB_VERSION }))).into_response()
    } else {
        (StatusCode::NO_CONTENT, headers).into_response()
    }
}

/// A request body, gunzipped when it says `Content-Encoding: gzip` (Telegraf's default),
/// within the same byte limit as a plain body.
fn decoded_body(node: &Node, headers: &axum::http::HeaderMap, raw: Bytes) -> Result<Bytes, ApiError> {
    match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("?")) {
        None | Some("identity") => Ok(raw),
        Some("gzip") => {
            use std::io::Read;
            let limit = node.cfg.http_body_bytes_max;
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&raw[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| ApiError::bad(format!("the gzip body cannot be decoded: {e}")))?;
            if out.len() > limit {
                return Err(ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    message: format!("the gunzipped request body is larger than {limit} bytes (shoal.http.max-body)"),
                });
            }
            Ok(out.into())
        }
        Some(other) => Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: format!("Content-Encoding {other:?} is not supported (gzip is)"),
        }),
    }
}

/// The namespace of an Influx request: `namespace` (Shoal's name), or `rp` (InfluxDB's
/// retention policy), or `shoal.write.default-namespace`.
fn influx_namespace<'a>(node: &'a Node, params: &'a HashMap<String, String>) -> &'a str {
    params
        .get("namespace")
        .or_else(|| params.get("rp"))
        .map(String::as_str)
        .filter(|ns| !ns.is_empty())
        .unwrap_or(&node.cfg.default_namespace)
}

/// `POST /api/v1/write?db=D[&namespace=N]`: Prometheus remote_write ([`crate::prometheus`]);
/// `db` defaults to `prometheus`. Skipped samples (stale markers) and series (names Shoal
/// cannot take) are counted in `X-Shoal-Skipped-Samples` / `X-Shoal-Skipped-Series`.
async fn remote_write(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
    WriteBody(raw): WriteBody,
) -> Result<Response, ApiError> {
    let db = params.get("db").map(String::as_str).unwrap_or("prometheus");
    caller.require(db, Perm::Write).map_err(|m| forbidden(&node, m))?;
    let namespace = influx_namespace(&node, &params);
    let (batch, skipped) = crate::prometheus::parse_remote_write(&raw, db, namespace, node.cfg.write_batch_points_max)
        .map_err(ApiError::bad)?;
    drop(raw);
    if let Some(first) = &skipped.first_series {
        tracing::debug!(series = skipped.series, first = %first, "remote_write series skipped");
    }
    if !batch.is_empty() {
        node.ingest(batch, consistency(&params)?).await?;
    }
    node.metrics.samples_skipped.fetch_add(skipped.samples as u64, Relaxed);
    node.metrics.fields_skipped.fetch_add(skipped.series as u64, Relaxed);
    Ok((
        StatusCode::NO_CONTENT,
        [
            ("x-shoal-skipped-samples", skipped.samples.to_string()),
            ("x-shoal-skipped-series", skipped.series.to_string()),
        ],
    )
        .into_response())
}

/// `POST /write`: InfluxDB 1.x line protocol (`db`, optional `rp`/`namespace`, `precision`,
/// gzip bodies). String fields are skipped and counted in `X-Shoal-Skipped-Fields`, or refused
/// with `strict=true` (`shoal.write.strict-fields`).
async fn post_write(
    State(node): State<Arc<Node>>,
    headers: axum::http::HeaderMap,
    Query(params): Query<HashMap<String, String>>,
    WriteBody(raw): WriteBody,
) -> Result<Response, ApiError> {
    let raw = decoded_body(&node, &headers, raw)?;
    let db = params.get("db").ok_or_else(|| ApiError::bad("query parameter \"db\" is required"))?;
    let namespace = influx_namespace(&node, &params);
    let precision = match params.get("precision") {
        None => Precision::Ns,
        Some(p) => Precision::parse(p)
            .ok_or_else(|| ApiError::bad(format!("precision {p:?} is not one of n, ns, u, us, ms, s, m, h")))?,
    };
    let strict = match params.get("strict").map(String::as_str) {
        None => node.cfg.strict_fields,
        Some("true") => true,
        Some("false") => false,
        Some(other) => return Err(ApiError::bad(format!("parameter strict: expected true or false, got {other:?}"))),
    };
    let text = std::str::from_utf8(&raw).map_err(|e| ApiError::bad(format!("body is not UTF-8: {e}")))?;
    let batch = ingest::parse_line_protocol(
        text,
        db,
        namespace,
        precision,
        node.env.clock.now_ms(),
        node.cfg.write_batch_points_max,
    )?;
    // The body goes before the batch is made durable: a body of 100,000 lines is 6 MB, held
    // for nothing through the WAL's fsync, once per loader.
    drop(raw);
    let skipped = batch.skipped_fields;
    if let Some(first) = batch.first_skipped.as_ref().filter(|_| strict) {
        return Err(ApiError::bad(format!(
            "{first} is a string; Shoal stores numbers only (strict mode refuses the batch; without it string fields are skipped)"
        )));
    }
    if !batch.is_empty() {
        node.ingest(batch, consistency(&params)?).await?;
    }
    node.metrics.fields_skipped.fetch_add(skipped as u64, Relaxed);
    // Influx clients expect 204 on success.
    Ok((StatusCode::NO_CONTENT, [("x-shoal-skipped-fields", skipped.to_string())]).into_response())
}

/// `GET /query`: InfluxQL ([`crate::influxql`]).
async fn get_query(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    influx_query(&node, &caller, params).await
}

/// InfluxQL statements of `q`, answered in InfluxDB's shape. A statement that fails is its
/// result's `error` (200); a query that does not parse is a 400, as in InfluxDB.
async fn influx_query(node: &Node, caller: &Caller, params: HashMap<String, String>) -> Result<Response, ApiError> {
    let influx_error =
        |status: StatusCode, message: String| (status, Json(serde_json::json!({ "error": message }))).into_response();
    let Some(q) = params.get("q") else {
        return Ok(influx_error(StatusCode::BAD_REQUEST, "missing required parameter \"q\"".into()));
    };
    let epoch = match crate::influxql::Epoch::parse(params.get("epoch").map(String::as_str)) {
        Ok(e) => e,
        Err(e) => return Ok(influx_error(StatusCode::BAD_REQUEST, e)),
    };
    let now_ms = node.env.clock.now_ms();
    let statements = match crate::influxql::parse::parse(q, now_ms) {
        Ok(s) => s,
        Err(e) => return Ok(influx_error(StatusCode::BAD_REQUEST, format!("error parsing query: {e}"))),
    };
    let ctx = crate::influxql::Context {
        db: params.get("db").map(String::as_str).filter(|d| !d.is_empty()),
        rp: params.get("rp").map(String::as_str).filter(|r| !r.is_empty()),
        epoch,
        now_ms,
    };
    for statement in &statements {
        let perm = if crate::influxql::needs_admin(statement) { Perm::Admin } else { Perm::Read };
        let db = crate::influxql::statement_db(statement, &ctx).unwrap_or(crate::auth::ALL_DBS);
        if let Err(m) = caller.require(db, perm) {
            return Ok(influx_error(StatusCode::FORBIDDEN, m));
        }
    }
    node.metrics.queries.fetch_add(statements.len() as u64, Relaxed);
    let started = tokio::time::Instant::now();
    let answer = crate::influxql::run(node, statements, &ctx).await;
    node.metrics.query_seconds.observe(started.elapsed());
    Ok(Json(answer).into_response())
}

/// `POST /query`: InfluxQL when it carries `q` (in the URL or a form body, as Influx clients
/// send it), otherwise an NSDb JSON query.
async fn post_query(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    Query(mut params): Query<HashMap<String, String>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(&node, raw)?;
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if form {
        let fields: HashMap<String, String> = serde_urlencoded::from_bytes(&raw)
            .map_err(|e| ApiError::bad(format!("the form body cannot be read: {e}")))?;
        params.extend(fields);
    }
    if params.contains_key("q") {
        return influx_query(&node, &caller, params).await;
    }
    nsdb_query(&node, &caller, &params, &raw).await.map(IntoResponse::into_response)
}

async fn nsdb_query(
    node: &Node,
    caller: &Caller,
    params: &HashMap<String, String>,
    raw: &[u8],
) -> Result<Response, ApiError> {
    let req: QueryRequest = serde_json::from_slice(raw).map_err(|e| ApiError::bad(format!("query body: {e}")))?;
    if !caller.allows(&req.db, Perm::Admin) {
        // A DELETE needs admin, a select read: the statement says which.
        let statement = crate::query::plan::parse(&req.query_string, 0).map_err(|e| ApiError::bad(e.0))?;
        let perm = match statement {
            crate::query::plan::Statement::Delete(_) => Perm::Admin,
            crate::query::plan::Statement::Select(_) => Perm::Read,
        };
        caller.require(&req.db, perm).map_err(|m| forbidden(node, m))?;
    }
    let allow_partial = match params.get("partial").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(ApiError::bad(format!("parameter partial: expected true or false, got {other:?}"))),
    };
    let started = tokio::time::Instant::now();
    let outcome = node.query(req, allow_partial).await;
    node.metrics.query_seconds.observe(started.elapsed());
    match outcome? {
        QueryOutcome::Records(body) => {
            Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
        }
        QueryOutcome::Deleted(n) => Ok(Json(serde_json::json!({ "records": [], "deleted": n })).into_response()),
    }
}

fn catalog_tree(node: &Node) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut tree: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for key in node.catalog.metrics() {
        tree.entry(key.db).or_default().entry(key.namespace).or_default().insert(key.metric);
    }
    tree
}

async fn list_dbs(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "dbs": catalog_tree(&node).keys().collect::<Vec<_>>() }))
}

async fn list_namespaces(
    State(node): State<Arc<Node>>,
    Path(db): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tree = catalog_tree(&node);
    let namespaces = tree
        .get(&db)
        .ok_or_else(|| ApiError { status: StatusCode::NOT_FOUND, message: format!("db {db} does not exist") })?;
    Ok(Json(serde_json::json!({ "db": db, "namespaces": namespaces.keys().collect::<Vec<_>>() })))
}

async fn list_metrics(
    State(node): State<Arc<Node>>,
    Path((db, ns)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tree = catalog_tree(&node);
    let metrics = tree.get(&db).and_then(|n| n.get(&ns)).ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("namespace {db}.{ns} does not exist"),
    })?;
    Ok(Json(serde_json::json!({ "db": db, "namespace": ns, "metrics": metrics })))
}

fn metric_key(db: &str, ns: &str, metric: &str) -> Result<MetricKey, ApiError> {
    MetricKey::new(db, ns, metric).map_err(ApiError::bad)
}

async fn describe_metric(
    State(node): State<Arc<Node>>,
    Path((db, ns, metric)): Path<(String, String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = metric_key(&db, &ns, &metric)?;
    let schema = node
        .catalog
        .schema(&key)
        .ok_or_else(|| ApiError { status: StatusCode::NOT_FOUND, message: format!("metric {key} does not exist") })?;
    let mut out = schema.to_json();
    out["metric"] = metric.into();
    Ok(Json(out))
}

async fn drop_metric(
    State(node): State<Arc<Node>>,
    Path((db, ns, metric)): Path<(String, String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = metric_key(&db, &ns, &metric)?;
    node.drop_metric(&key).await?;
    Ok(Json(serde_json::json!({ "dropped": key.to_string() })))
}

/// This node's status, or with `?node=<id>` another member's, fetched through this node.
async fn status(
    State(node): State<Arc<Node>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(target) = params.get("node").filter(|id| **id != node.cfg.node_id) else {
        let mut status = node.status();
        status["members"] = serde_json::to_value(node.members().await).unwrap_or_default();
        return Ok(Json(status));
    };
    let members = node.members().await;
    let member = members.iter().find(|m| m.id == *target).ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no member {target} in this node's view"),
    })?;
    let unavailable = |message: String| ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message };
    let addr =
        member.http_addr.as_ref().ok_or_else(|| unavailable(format!("member {target} has no HTTP address yet")))?;
    let bytes = node
        .peers
        .get(addr, "/internal/v1/status")
        .await
        .map_err(|e| unavailable(format!("member {target} did not answer: {e}")))?;
    let value =
        serde_json::from_slice(&bytes).map_err(|e| unavailable(format!("member {target} answered badly: {e}")))?;
    Ok(Json(value))
}

async fn internal_status(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let mut status = node.status();
    status["members"] = serde_json::to_value(node.members().await).unwrap_or_default();
    Json(status)
}

fn keyring_error(e: crate::keyring::KeyringError) -> ApiError {
    use crate::keyring::KeyringError::*;
    let status = match e {
        TooShort | RemovePrimary | Unknown(_) => StatusCode::BAD_REQUEST,
        Off => StatusCode::CONFLICT,
        File { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError { status, message: e.to_string() }
}

/// The key ids of this node's keyring (never the secrets).
async fn cluster_keyring(State(node): State<Arc<Node>>) -> Result<Json<crate::keyring::KeyringView>, ApiError> {
    let keyring = node.keyring.as_ref().ok_or_else(|| keyring_error(crate::keyring::KeyringError::Off))?;
    Ok(Json(keyring.view()))
}

/// `{"op": "install"|"use"|"remove", "key": "<secret>"}`: applied here, then on every live
/// member; the answer gives each member's keyring or error.
async fn change_keyring(
    State(node): State<Arc<Node>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let raw = body(&node, raw)?;
    let op: crate::keyring::KeyringOp = serde_json::from_slice(&raw).map_err(|e| {
        ApiError::bad(format!(
            "keyring change: {e}; expected {{\"op\": \"install\"|\"use\"|\"remove\", \"key\": \"<secret>\"}}"
        ))
    })?;
    let keyring = node.keyring.as_ref().ok_or_else(|| keyring_error(crate::keyring::KeyringError::Off))?;
    let mine = keyring.apply(&op).map_err(keyring_error)?;
    let mut nodes = serde_json::Map::new();
    nodes.insert(node.cfg.node_id.clone(), serde_json::json!(mine));
    // JSON inside too: the change is tagged (`op`/`key`), which postcard cannot decode.
    let body = serde_json::to_vec(&op).expect("keyring changes encode");
    let members = node.members().await;
    let peers =
        members.iter().filter(|m| !m.is_self && m.is_live()).filter_map(|m| Some((m.id.clone(), m.http_addr.clone()?)));
    let answers = futures_util::future::join_all(peers.map(|(id, addr)| {
        let (node, body) = (node.clone(), body.clone());
        async move { (id, node.peers.post(&addr, "/internal/v1/keyring", body).await) }
    }))
    .await;
    for (id, answer) in answers {
        let value = match answer.map(|b| serde_json::from_slice::<crate::keyring::KeyringView>(&b)) {
            Ok(Ok(view)) => serde_json::json!(view),
            Ok(Err(e)) => serde_json::json!({ "error": e.to_string() }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        nodes.insert(id, value);
    }
    Ok(Json(serde_json::json!({ "nodes": nodes })))
}

async fn internal_keyring(
    State(node): State<Arc<Node>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let op: crate::keyring::KeyringOp =
        serde_json::from_slice(&body(&node, raw)?).map_err(|e| ApiError::bad(format!("keyring change: {e}")))?;
    let keyring = node.keyring.as_ref().ok_or_else(|| keyring_error(crate::keyring::KeyringError::Off))?;
    Ok(Json(keyring.apply(&op).map_err(keyring_error)?).into_response())
}

/// Internal requests must carry our cluster id: a node of another cluster gets 403.
fn check_cluster(node: &Node, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    match headers.get(crate::peer::CLUSTER_HEADER).and_then(|v| v.to_str().ok()) {
        Some(id) if id == node.cfg.cluster_id => Ok(()),
        other => Err(ApiError {
            status: StatusCode::FORBIDDEN,
            message: format!("internal request for cluster {other:?}; this node belongs to {:?}", node.cfg.cluster_id),
        }),
    }
}

/// Compares the asker's per-metric digests with this node's: answers with this node's parts
/// that differ and the metrics it wants the asker's parts of.
async fn internal_catalog_diff(
    State(node): State<Arc<Node>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(&node, raw)?;
    let request: crate::catalog::CatalogDiffRequest =
        postcard::from_bytes(&raw).map_err(|e| ApiError::bad(format!("catalog diff request: {e}")))?;
    let diff = node.catalog.diff(&request.digests, request.metric.as_ref());
    let bytes = postcard::to_stdvec(&diff).expect("diffs encode");
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn internal_catalog_push(
    State(node): State<Arc<Node>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let raw = body(&node, raw)?;
    let state =
        crate::catalog::CatalogState::from_bytes(&raw).map_err(|e| ApiError::bad(format!("catalog state: {e}")))?;
    node.merge_catalog(state).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Shard placement from the catalog, with each replica's state in this node's view; with
/// `?verify=true` also each replica's point count and digest, as the replica reports them.
async fn cluster_shards(
    State(node): State<Arc<Node>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let verify = match params.get("verify").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(ApiError::bad(format!("verify: expected true or false, got {other:?}"))),
    };
    Ok(Json(serde_json::json!({ "shards": shard_map(&node, verify, usize::MAX).await })))
}

/// The catalog's shards (the first `limit` in placement order) with each replica's member
/// state and, with `verify`, the points and digest each replica reports.
pub(crate) async fn shard_map(node: &Arc<Node>, verify: bool, limit: usize) -> Vec<serde_json::Value> {
    let members = node.members().await;
    let state = |id: &str| {
        members.iter().find(|m| m.id == id).map_or("unknown".to_string(), |m| {
            serde_json::to_value(m.state).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
        })
    };
    let interval = node.shard_interval_ms();
    let shards = node.catalog.placement().into_iter().take(limit).map(|(shard, replicas)| {
        let (node, members, of) = (node, &members, shard.clone());
        let replicas = replicas.into_iter().map(move |id| {
            let shard = of.clone();
            async move {
                let mut r = serde_json::json!({"id": id, "state": state(&id)});
                if verify {
                    let found = node.verify_replica(members, &shard, &id).await;
                    r["points"] = found.map_or(serde_json::Value::Null, |(points, _)| points.into());
                    r["digest"] = found.map_or(serde_json::Value::Null, |(_, d)| format!("{d:016x}").into());
                }
                r
            }
        });
        async move {
            serde_json::json!({
                "db": shard.metric.db,
                "namespace": shard.metric.namespace,
                "metric": shard.metric.metric,
                "start": shard.start,
                "end": shard.start.saturating_add(interval),
                "replicas": futures_util::future::join_all(replicas).await,
            })
        }
    });
    futures_util::future::join_all(shards).await
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, raw: &[u8]) -> Result<T, ApiError> {
    postcard::from_bytes(raw).map_err(|e| ApiError::bad(format!("{what}: {e}")))
}

/// A postcard answer of the internal API.
fn encoded<T: serde::Serialize>(value: &T) -> Result<Response, ApiError> {
    let bytes = postcard::to_stdvec(value).map_err(|e| ApiError::from(NodeError::Internal(e.to_string())))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn internal_write(
    State(node): State<Arc<Node>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let write = decode("replica write", &body(&node, raw)?)?;
    node.replica_write(write).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn internal_merge(
    State(node): State<Arc<Node>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let write = decode("replica merge", &body(&node, raw)?)?;
    encoded(&node.replica_merge(write).await?)
}

async fn internal_digests(
    State(node): State<Arc<Node>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = decode("digest request", &body(&node, raw)?)?;
    encoded(&node.replica_digests(req).await?)
}

async fn internal_points(
    State(node): State<Arc<Node>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = decode("points request", &body(&node, raw)?)?;
    encoded(&node.replica_points(req).await?)
}

async fn internal_delete(
    State(node): State<Arc<Node>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = decode("replica delete", &body(&node, raw)?)?;
    encoded(&node.replica_delete(req).await?)
}

async fn internal_tombstones(
    State(node): State<Arc<Node>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = decode("tombstones request", &body(&node, raw)?)?;
    encoded(&node.replica_tombstones(req).await?)
}

async fn internal_partial(
    State(node): State<Arc<Node>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(&node, raw)?;
    let (req, ask) = crate::peer::decode_with_tail::<_, crate::peer::LeaseAsk>(&raw)
        .map_err(|e| ApiError::bad(format!("partial request: {e}")))?;
    let (answer, granted) = node.replica_partial(req, ask.as_ref().map(|a| a.holder.as_str())).await?;
    let grant = ask.map(|_| crate::peer::LeaseGrant { granted });
    let bytes = crate::peer::encode_with_tail(&answer, grant.as_ref());
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// `POST /internal/v1/revoke`: a replica's copy of a shard is about to change; the read lease
/// this node holds on it ends now.
async fn internal_revoke(
    State(node): State<Arc<Node>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let revoke: crate::lease::Revoke = decode("revoke", &body(&node, raw)?)?;
    node.leases.revoke_held(&revoke);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The status page (docs/operations.md): server-rendered, no script, refreshes itself.
async fn ui_page(State(node): State<Arc<Node>>) -> Response {
    let html = crate::ui::page(&node).await;
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], html).into_response()
}

async fn cluster_members(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "members": node.members().await }))
}

/// Starts a graceful leave; the node exits once its peers had time to hear it. An abandoned
/// leave shows in `GET /status` (`repair.leave.abandoned`) and the node keeps running.
async fn cluster_leave(State(node): State<Arc<Node>>) -> Response {
    if let Err(e) = node.begin_leave() {
        return ApiError { status: StatusCode::CONFLICT, message: e.to_string() }.into_response();
    }
    let leaving = node.clone();
    tokio::spawn(async move {
        match leaving.complete_leave().await {
            Ok(()) => leaving.request_stop(),
            Err(e) => tracing::error!(error = %e, "the leave did not complete"),
        }
    });
    (StatusCode::ACCEPTED, Json(serde_json::json!({ "leaving": node.cfg.node_id }))).into_response()
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let readiness = node.readiness();
    let status = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(readiness)).into_response()
}

async fn prometheus(State(node): State<Arc<Node>>) -> Response {
    let mut text = node.metrics.render(node.storage.shard_count());
    // Gauges read at scrape time: members by state in this node's view, hints waiting, and
    // how long ago the last full repair round finished.
    let mut states: BTreeMap<String, usize> =
        ["alive", "suspect", "dead", "left"].into_iter().map(|s| (s.to_string(), 0)).collect();
    for m in node.members().await {
        *states.entry(format!("{:?}", m.state).to_lowercase()).or_default() += 1;
    }
    let name = "shoal_members";
    text.push_str(&format!("# HELP {name} Members in this node's view, by state.\n# TYPE {name} gauge\n"));
    for (state, n) in states {
        text.push_str(&format!("{name}{{state=\"{state}\"}} {n}\n"));
    }
    let pending = node.hints.pending();
    let name = "shoal_hints_pending_bytes";
    text.push_str(&format!("# HELP {name} Bytes of hints waiting for a replica.\n# TYPE {name} gauge\n"));
    text.push_str(&format!("{name} {}\n", pending.iter().map(|(_, b)| b).sum::<u64>()));
    let name = "shoal_hints_pending_targets";
    text.push_str(&format!(
        "# HELP {name} Replicas with hints waiting.\n# TYPE {name} gauge\n{name} {}\n",
        pending.len()
    ));
    let finished = node.metrics.repair_round_finished_ms.load(Relaxed);
    let name = "shoal_repair_lag_seconds";
    text.push_str(&format!(
        "# HELP {name} Seconds since this node last finished a full repair round (since start before the first).\n# TYPE {name} gauge\n{name} {}\n",
        (node.env.clock.now_ms() - if finished > 0 { finished } else { node.started_ms }).max(0) as f64 / 1000.0
    ));
    if let Some(keyring) = &node.keyring {
        let name = "shoal_cluster_auth_rejected_total";
        text.push_str(&format!(
            "# HELP {name} Gossip datagrams and internal requests refused for want of a cluster key.\n# TYPE {name} counter\n{name} {}\n",
            keyring.rejected.load(Relaxed)
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

async fn index(State(node): State<Arc<Node>>) -> Html<String> {
    let status = node.status();
    let rows: String = status
        .as_object()
        .map(|o| {
            o.iter().map(|(k, v)| format!("<tr><th>{k}</th><td>{}</td></tr>", escape_html(&v.to_string()))).collect()
        })
        .unwrap_or_default();
    Html(format!(
        "<!doctype html><title>Shoal {id}</title><h1>Shoal node {id}</h1><table>{rows}</table>\
         <p><a href=\"/status\">/status</a> · <a href=\"/metrics\">/metrics</a> · <a href=\"/commands/dbs\">/commands/dbs</a></p>",
        id = node.cfg.node_id
    ))
}
