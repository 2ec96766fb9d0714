//! HTTP edge shared by services: RFC 9457 problem responses, a JSON extractor whose rejections are
//! problems too, size limits, health/readiness/dead-letter routes and graceful serving.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::auth::AdminAuth;
use crate::edge::EdgeLimits;
use crate::service::{Readiness, StartError};

/// Largest request body accepted (bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// An `application/problem+json` error response.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI reference naming the problem type.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What went wrong this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Problem {
    /// A problem with `status`, a slug for its type and a detail.
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Self {
        Self {
            problem_type: format!("/problems/{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: Some(detail.into()),
        }
    }

    /// 400.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }
    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }
    /// 409.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }
    /// 422.
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", detail)
    }
    /// 503, for storage trouble; the cause is logged, not leaked.
    pub fn unavailable(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed on a dependency");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "a dependency is unavailable; retry later",
        )
    }
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        Problem::unavailable(&e)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            serde_json::to_vec(&self).unwrap_or_default(),
        )
            .into_response()
    }
}

/// `Json<T>` whose every rejection (bad syntax, wrong shape, wrong content type, too large) is a
/// problem response.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_problem(rejection)),
        }
    }
}

fn json_problem(rejection: JsonRejection) -> Problem {
    let status = rejection.status();
    let slug = match rejection {
        JsonRejection::JsonDataError(_) => "invalid-body",
        JsonRejection::JsonSyntaxError(_) => "malformed-json",
        JsonRejection::MissingJsonContentType(_) => "unsupported-media-type",
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => "body-too-large",
        _ => "bad-request",
    };
    Problem::new(status, slug, rejection.body_text())
}

/// `Query<T>` whose rejection (a query string that does not fit `T`, a repeated parameter) is a
/// 400 problem.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(Problem::new(r.status(), "bad-query", r.body_text())),
        }
    }
}

/// `Path<T>` whose rejection (a segment that is not UTF-8 once decoded, or does not fit `T`) is a
/// problem.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(r) => Err(Problem::new(r.status(), "bad-path", r.body_text())),
        }
    }
}

/// Media type of every error answer.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Name of the bearer scheme that admin and seeding routes require in every OpenAPI document:
/// annotate such a route with `security(("admin_token" = []))`.
pub const ADMIN_SECURITY: &str = "admin_token";

/// Answer of the un-park routes.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Unparked {
    /// Rows put back in line.
    pub unparked: u64,
}

/// The service's own OpenAPI document served at `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", tag = "probes",
    responses((status = 200, description = "This document", body = Object)))]
#[allow(dead_code)]
fn openapi_json() {}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "probes",
    responses(
        (status = 200, description = "Prometheus text format", body = String,
            content_type = "text/plain; version=0.0.4; charset=utf-8"),
        (status = 503, description = "Another metrics recorder is installed in this process",
            body = Problem, content_type = PROBLEM_JSON),
    ))]
#[allow(dead_code)]
fn metrics() {}

/// What a redrive did (`crate::redrive::Redriven`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum Redriven {
    /// The handler applied it now.
    Applied,
    /// The inbox had it already: nothing applied twice.
    Duplicate,
}

/// Answer of `POST /admin/dead-letters/{id}/retry`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
struct RedriveAnswer {
    /// The dead letter, as given.
    id: String,
    /// What the redrive did.
    outcome: Redriven,
}

/// Re-apply a dead letter through its consumer's handler, with its original event id.
#[utoipa::path(post, path = "/admin/dead-letters/{id}/retry", tag = "admin",
    security(("admin_token" = [])),
    params(("id" = i64, Path, description = "Dead letter id, from the list")),
    responses(
        (status = 200, description = "Applied, or found already applied", body = RedriveAnswer),
        (status = 404, description = "No such dead letter", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "Redriven or discarded before", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "Still cannot be applied, or not a consumer of this service",
            body = Problem, content_type = PROBLEM_JSON),
    ))]
#[allow(dead_code)]
fn redrive_retry() {}

/// Discard a dead letter (the row stays, marked discarded).
#[utoipa::path(delete, path = "/admin/dead-letters/{id}", tag = "admin",
    security(("admin_token" = [])),
    params(("id" = i64, Path, description = "Dead letter id, from the list")),
    responses(
        (status = 204, description = "Discarded"),
        (status = 404, description = "No such dead letter", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "Redriven or discarded before", body = Problem, content_type = PROBLEM_JSON),
    ))]
#[allow(dead_code)]
fn redrive_discard() {}

/// The routes every service gets from the toolkit ([`finish_router`], [`App::new`]).
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        healthz,
        readyz,
        openapi_json,
        metrics,
        dead_letters,
        redrive_retry,
        redrive_discard,
        stats,
        parked_rows,
        unpark_all,
        unpark_one
    ),
    components(schemas(Problem, Unparked))
)]
struct ToolkitApi;

/// A service's OpenAPI document completed with what every service shares, so the document
/// describes every answer:
/// - the routes of [`finish_router`] and the admin bearer scheme ([`ADMIN_SECURITY`]);
/// - 401 and 403 problems on every route that requires it;
/// - 400, 413, 415 and 422 problems on every route with a JSON body ([`ApiJson`] rejections);
/// - 400 problems on every route with path or query parameters ([`ApiPath`], [`ApiQuery`]);
/// - 503 problems on every route but the probes: load shedding, the request timeout and storage
///   trouble answer it, with `Retry-After`.
///
/// Unknown paths answer a 404 problem and unknown methods a 405 problem.
pub fn document(service: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::path::ParameterIn;
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
    use utoipa::OpenApi as _;

    let mut doc = service.merge_from(ToolkitApi::openapi());
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
        ADMIN_SECURITY,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "`Authorization: Bearer <ADMIN_TOKEN>`: missing or wrong is 401; a service \
                         started without ADMIN_TOKEN answers 403",
                ))
                .build(),
        ),
    );
    for (path, item) in doc.paths.paths.iter_mut() {
        // Outside the in-flight limit and the request timeout.
        let probe = matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics");
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            let admin = op.security.as_ref().is_some_and(|s| !s.is_empty());
            let has_params = |kind: ParameterIn| {
                op.parameters
                    .iter()
                    .flatten()
                    .any(|p| p.parameter_in == kind)
            };
            let (path_params, query_params) = (
                has_params(ParameterIn::Path),
                has_params(ParameterIn::Query),
            );
            let mut add = |status: &str, description: &str| {
                op.responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| problem_response(description).into());
            };
            if path_params {
                add("400", "A path segment is not valid UTF-8 once decoded");
            }
            if query_params {
                add("400", "A query parameter is malformed or repeated");
            }
            if admin {
                add("401", "Missing or wrong bearer token");
                add(
                    "403",
                    "Admin routes are disabled: the service has no ADMIN_TOKEN",
                );
            }
            if op.request_body.is_some() {
                add("400", "Malformed JSON");
                add("413", "Body larger than 64 KiB");
                add("415", "Content-Type is not application/json");
                add(
                    "422",
                    "The body does not have the documented shape, or breaks a rule",
                );
            }
            if !probe {
                add(
                    "503",
                    "Overloaded, timed out, or storage unavailable; retry after `Retry-After`",
                );
            }
        }
    }
    doc
}

fn problem_response(description: &str) -> utoipa::openapi::Response {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(description)
        .content(
            PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

/// Body limit, problem-shaped 404/405, and the probes every service serves:
/// `GET /healthz`, `GET /readyz`, and behind the admin token `GET /admin/dead-letters`,
/// `GET /admin/stats`.
pub fn finish_router(
    app: Router,
    readiness: Readiness,
    admin: &AdminAuth,
    limits: &EdgeLimits,
) -> Router {
    let probes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(readiness.clone());
    let admin_routes = admin.protect_all(
        Router::new()
            .route("/admin/dead-letters", get(dead_letters))
            .route("/admin/stats", get(stats))
            .route("/admin/outbox/parked", get(parked_rows))
            .route("/admin/outbox/parked/retry", post(unpark_all))
            .route("/admin/outbox/parked/{id}/retry", post(unpark_one))
            .with_state(readiness),
    );
    // Probes stay outside the in-flight limit: an overloaded service is still alive.
    limits
        .limit(app.merge(admin_routes))
        .merge(probes)
        .fallback(|| async { Problem::not_found("no such resource") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "method not allowed on this resource",
            )
        })
        .route("/metrics", get(crate::observe::render))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Outermost last: a request id is set (or kept from the caller) first, then the access
        // log and metrics see it, and the answer carries it back.
        .layer(axum::middleware::from_fn(crate::observe::track_http))
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            tower_http::request_id::MakeRequestUuid,
        ))
}

/// Liveness: the process answers HTTP.
#[utoipa::path(get, path = "/healthz", tag = "probes",
    responses((status = 200, description = "Alive", body = Object)))]
async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: database, NATS and consumers.
#[utoipa::path(get, path = "/readyz", tag = "probes",
    responses(
        (status = 200, description = "Ready; the report names each dependency", body = Object),
        (status = 503, description = "Not ready; the same report says what is missing", body = Object),
    ))]
async fn readyz(State(r): State<Readiness>) -> Response {
    let report = r.check().await;
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

/// Counters for benchmarks and operators: write transactions begun, outbox rows by state.
#[utoipa::path(get, path = "/admin/stats", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "Counters", body = Object)))]
async fn stats(State(r): State<Readiness>) -> Result<impl IntoResponse, Problem> {
    let outbox = crate::outbox::stats(r.db()).await?;
    Ok(Json(serde_json::json!({
        "transactions": r.db().transactions(),
        "outbox": outbox,
    })))
}

/// Dead letters, newest first: messages a consumer gave up on, with their payload and reason.
#[utoipa::path(get, path = "/admin/dead-letters", tag = "admin", security(("admin_token" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of dead letters; `next` is the cursor of the following page",
            body = Page<crate::consumer::DeadLetter>),
        (status = 400, description = "Bad `limit` or `after`", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn dead_letters(
    State(r): State<Readiness>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<crate::consumer::DeadLetter>>, Problem> {
    let limit = q.limit()?;
    let before = match q.after() {
        None => None,
        Some(a) => Some(
            a.parse::<i64>()
                .ok()
                .filter(|a| *a > 0)
                .ok_or_else(bad_cursor)?,
        ),
    };
    let rows = crate::consumer::dead_letters_before(r.db(), before, limit + 1).await?;
    Ok(Json(Page::from_rows(rows, limit, |d| d.id.to_string())))
}

/// `?limit=&after=` of a cursor-paged list.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1-1000 (default 100).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// The `next` cursor of the previous page (opaque); absent for the first page.
    pub after: Option<String>,
}

/// A required query parameter that names an entity (`?order_id=`): 1-64 characters, else 400.
pub fn required_param(value: Option<String>, name: &str) -> Result<String, Problem> {
    value
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .ok_or_else(|| {
            Problem::bad_request(format!(
                "{name} query parameter (1-64 characters) is required"
            ))
        })
}

impl PageQuery {
    /// The page size: 100 by default, else 1-1000 (400 otherwise).
    pub fn limit(&self) -> Result<i64, Problem> {
        parse_limit(self.limit.as_deref())
    }

    /// The cursor, if one was given (an empty `after=` is the first page).
    pub fn after(&self) -> Option<&str> {
        self.after.as_deref().filter(|a| !a.is_empty())
    }
}

/// One page of a list: `next` is the `after` of the following page, `null` on the last one.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    /// The items of this page, in the list's order.
    pub items: Vec<T>,
    /// Opaque cursor of the next page; `null` when there is none.
    pub next: Option<String>,
}

impl<T> Page<T> {
    /// A page from up to `limit + 1` rows in list order: the extra row, if any, only says that
    /// another page follows (so the last page says `next: null` instead of leading to an empty one).
    pub fn from_rows(mut rows: Vec<T>, limit: i64, cursor: impl Fn(&T) -> String) -> Self {
        let limit = usize::try_from(limit).unwrap_or(0);
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more { rows.last().map(cursor) } else { None };
        Self { items: rows, next }
    }
}

/// 400 for an `after` that is not a cursor this list handed out.
pub fn bad_cursor() -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "bad-cursor",
        "after must be the `next` cursor of a previous page",
    )
}

/// Rows the relay gave up on, oldest first; `next` is the cursor of the following page.
#[utoipa::path(get, path = "/admin/outbox/parked", tag = "admin", security(("admin_token" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of parked outbox rows", body = Page<serde_json::Value>),
        (status = 400, description = "Bad `limit` or `after`", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn parked_rows(
    State(r): State<Readiness>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<impl IntoResponse, Problem> {
    let limit = parse_limit(q.limit.as_deref())?;
    let after =
        match q.after.as_deref() {
            None | Some("") => 0,
            Some(a) => a.parse::<i64>().ok().filter(|a| *a >= 0).ok_or_else(|| {
                Problem::bad_request("after must be a row id from a previous page")
            })?,
        };
    let rows = crate::outbox::parked(r.db(), after, limit).await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|row| row.id.to_string()))
        .flatten();
    Ok(Json(serde_json::json!({ "items": rows, "next": next })))
}

/// Un-park every parked row: the relay tries them again.
#[utoipa::path(post, path = "/admin/outbox/parked/retry", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "How many rows were un-parked", body = Unparked)))]
async fn unpark_all(State(r): State<Readiness>) -> Result<impl IntoResponse, Problem> {
    let n = crate::outbox::unpark(r.db(), None).await?;
    r.waker().wake();
    tracing::info!(
        rows = n,
        "parked outbox rows put back in line by an operator"
    );
    Ok(Json(serde_json::json!({ "unparked": n })))
}

/// Un-park one row; 404 if it is not parked.
#[utoipa::path(post, path = "/admin/outbox/parked/{id}/retry", tag = "admin", security(("admin_token" = [])),
    params(("id" = i64, Path, description = "Row id, from the parked list")),
    responses(
        (status = 200, description = "Un-parked", body = Unparked),
        (status = 404, description = "No parked row with this id", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn unpark_one(
    State(r): State<Readiness>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, Problem> {
    let id = id
        .parse::<i64>()
        .map_err(|_| Problem::not_found(format!("no parked row {id:?}")))?;
    match crate::outbox::unpark(r.db(), Some(id)).await? {
        0 => Err(Problem::not_found(format!("no parked row {id}"))),
        n => {
            r.waker().wake();
            tracing::info!(
                row = id,
                "parked outbox row put back in line by an operator"
            );
            Ok(Json(serde_json::json!({ "unparked": n })))
        }
    }
}

/// A `limit` query value: 100 when absent or empty, else an integer from 1 to 1000 (400 otherwise).
pub fn parse_limit(limit: Option<&str>) -> Result<i64, Problem> {
    match limit {
        None | Some("") => Ok(100),
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| Problem::bad_request("limit must be an integer from 1 to 1000")),
    }
}

/// Bind `addr`.
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

/// Serve `app` until SIGTERM/SIGINT, then stop in order: HTTP intake and consumers first, then
/// in-flight work, then the outbox flush.
pub async fn run_until_stopped(
    runtime: crate::service::Runtime,
    listener: tokio::net::TcpListener,
    app: Router,
) -> Result<(), StartError> {
    let shutdown = runtime.shutdown.clone();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            crate::service::termination_signal().await;
            tracing::info!("termination signal: shutting down");
            shutdown.cancel();
        }
    });
    serve_until_cancelled(runtime, listener, app).await
}

/// Serve until the runtime's shutdown token is cancelled (by whoever holds it), then stop in
/// order: intake first, then consumers and workers, then the outbox flush.
async fn serve_until_cancelled(
    runtime: crate::service::Runtime,
    listener: tokio::net::TcpListener,
    app: Router,
) -> Result<(), StartError> {
    let shutdown = runtime.shutdown.clone();
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(service = %runtime.name, %addr, "listening");
    let limits = runtime.edge.clone();
    let served = crate::edge::serve(listener, app, &limits, shutdown).await;
    runtime.stop().await;
    tracing::info!("stopped");
    served.map_err(|source| StartError::Bind { addr, source })
}

/// A built service, not yet serving: its runtime, its bound listener and its routes.
pub struct App {
    runtime: crate::service::Runtime,
    listener: tokio::net::TcpListener,
    router: Router,
}

impl App {
    /// Add the probes and limits to `routes` and bind `addr`.
    pub async fn new(
        runtime: crate::service::Runtime,
        routes: Router,
        addr: &str,
    ) -> Result<Self, StartError> {
        crate::observe::install();
        let redrive = runtime
            .admin
            .protect_all(crate::redrive::routes(runtime.redrive.clone()));
        let routes = routes.merge(redrive);
        let router = finish_router(routes, runtime.readiness(), &runtime.admin, &runtime.edge);
        let listener = bind(addr).await?;
        Ok(Self {
            runtime,
            listener,
            router,
        })
    }

    /// The bound HTTP port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serve until SIGTERM/SIGINT, then shut down in order.
    pub async fn run_until_stopped(self) -> Result<(), StartError> {
        run_until_stopped(self.runtime, self.listener, self.router).await
    }

    /// The token that stops this service when cancelled: for a service embedded in another
    /// program or a test, which stops it itself (see [`App::run_until_cancelled`]).
    pub fn stopper(&self) -> tokio_util::sync::CancellationToken {
        self.runtime.shutdown.clone()
    }

    /// The service's database.
    pub fn db(&self) -> &crate::Database {
        &self.runtime.db
    }

    /// Serve until [`App::stopper`] is cancelled, without listening for process signals; then
    /// shut down in order like [`App::run_until_stopped`].
    pub async fn run_until_cancelled(self) -> Result<(), StartError> {
        serve_until_cancelled(self.runtime, self.listener, self.router).await
    }
}
