//! Customer routes (`/api/...`), the pass-through for routed prefixes, and the OpenAPI document.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use event_toolkit::http::{parse_limit, ApiJson, ApiPath, ApiQuery, Problem, MAX_BODY_BYTES};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Customer;
use crate::upstream::{Answer, Call, CallError, Upstream};
use crate::Gateway;

/// Request headers the services get from a customer request: tracing, request id, idempotency.
const FORWARDED: [&str; 4] = [
    "x-request-id",
    "traceparent",
    "tracestate",
    "idempotency-key",
];

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

fn api_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARDED {
        if let Some(v) = incoming.get(name) {
            out.insert(HeaderName::from_static(name), v.clone());
        }
    }
    out
}

/// An upstream that gave no answer, as a problem.
fn call_problem(upstream: &Upstream, e: CallError) -> Response {
    tracing::warn!(upstream = upstream.name(), error = %e, "upstream call failed");
    let (status, slug, detail, retry_after) = match e {
        CallError::CircuitOpen { retry_after } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "circuit-open",
            format!("{} is failing; calls are paused", upstream.name()),
            retry_after.as_secs().max(1),
        ),
        CallError::Bulkhead => (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream-busy",
            format!("too many calls in flight to {}", upstream.name()),
            1,
        ),
        CallError::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream-timeout",
            format!("{} did not answer in time", upstream.name()),
            1,
        ),
        CallError::Unreachable(_) => (
            StatusCode::BAD_GATEWAY,
            "upstream-unreachable",
            format!("{} could not be reached", upstream.name()),
            1,
        ),
    };
    let mut r = Problem::new(status, slug, detail).into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    r
}

/// An upstream's answer passed on: status, body and the headers that describe it.
fn pass_on(answer: Answer, location_prefix: Option<(&str, &str)>) -> Response {
    let mut r = Response::new(Body::from(answer.body));
    *r.status_mut() = answer.status;
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER, header::LOCATION] {
        if let Some(v) = answer.headers.get(&name) {
            r.headers_mut().insert(name, v.clone());
        }
    }
    // The services' `Location: /orders/{id}` is `/api/orders/{id}` here.
    if let Some((from, to)) = location_prefix {
        if let Some(loc) = r
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
        {
            if let Some(rest) = loc.strip_prefix(from) {
                if let Ok(v) = HeaderValue::from_str(&format!("{to}{rest}")) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
            }
        }
    }
    r
}

fn not_found(id: &str) -> Response {
    Problem::not_found(format!("no order {id:?}")).into_response()
}

/// An order id safe to put in an upstream path (anything else cannot be an order).
fn order_id(id: &str) -> Option<&str> {
    (!id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .then_some(id)
}

/// The order if it is the customer's; 404 alike for another's and for none, so ids of other
/// customers' orders cannot be probed.
#[allow(clippy::result_large_err)] // built once per request, on the way out
fn owned(
    answer: Result<Answer, CallError>,
    gw: &Gateway,
    customer: &str,
    id: &str,
) -> Result<Value, Response> {
    let answer = answer.map_err(|e| call_problem(&gw.order, e))?;
    match answer.status {
        StatusCode::OK => {
            let order = answer.json().ok_or_else(|| {
                Problem::new(
                    StatusCode::BAD_GATEWAY,
                    "bad-upstream-answer",
                    "the order service answered something that is not an order",
                )
                .into_response()
            })?;
            if order["customer_id"].as_str() == Some(customer) {
                Ok(order)
            } else {
                Err(not_found(id))
            }
        }
        StatusCode::NOT_FOUND => Err(not_found(id)),
        _ => Err(pass_on(answer, None)),
    }
}

/// `POST /api/orders`: the customer is the token's; a body naming another is refused.
pub async fn place(
    State(gw): State<Arc<Gateway>>,
    Customer(customer): Customer,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<Value>,
) -> Response {
    let Some(fields) = body.as_object_mut() else {
        return Problem::unprocessable("the body must be a JSON object").into_response();
    };
    match fields.get("customer_id") {
        None | Some(Value::Null) => {
            fields.insert("customer_id".into(), Value::String(customer.clone()));
        }
        Some(Value::String(c)) if *c == customer => {}
        Some(_) => {
            return Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "customer_id must be the authenticated customer (or absent)",
            )
            .into_response()
        }
    }
    let mut out = api_headers(&headers);
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let call = Call {
        method: Method::POST,
        path: "/orders".into(),
        idempotent: out.contains_key("idempotency-key"),
        headers: out,
        body: Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
    };
    match gw.order.send(&call).await {
        Ok(answer) => pass_on(answer, Some(("/orders/", "/api/orders/"))),
        Err(e) => call_problem(&gw.order, e),
    }
}

/// `GET /api/orders` query.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// `GET /api/orders?status=&limit=&after=`: the customer's orders, newest first, one page of the
/// order service's own list filtered by customer (its cursor is passed through as it is).
pub async fn list(
    State(gw): State<Arc<Gateway>>,
    Customer(customer): Customer,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Response {
    if let Err(p) = parse_limit(q.limit.as_deref()) {
        return p.into_response();
    }
    let mut url = reqwest::Url::parse("http://upstream/orders").expect("static URL");
    {
        let mut qp = url.query_pairs_mut();
        qp.append_pair("customer_id", &customer);
        for (name, value) in [
            ("status", &q.status),
            ("limit", &q.limit),
            ("after", &q.after),
        ] {
            if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                qp.append_pair(name, v);
            }
        }
    }
    let path = format!("{}?{}", url.path(), url.query().unwrap_or(""));
    match gw.order.send(&Call::get(path, api_headers(&headers))).await {
        Ok(answer) => pass_on(answer, None),
        Err(e) => call_problem(&gw.order, e),
    }
}

/// A part of the aggregated view: the upstream's JSON (`pick` of it), or `{"unavailable": true}`.
fn part(
    upstream: &Upstream,
    answer: Result<Answer, CallError>,
    pick: impl Fn(Value) -> Value,
) -> Value {
    match answer {
        Ok(a) if a.status.is_success() => match a.json() {
            Some(v) => pick(v),
            None => json!({"unavailable": true}),
        },
        Ok(a) => {
            tracing::warn!(
                upstream = upstream.name(),
                status = a.status.as_u16(),
                "part of the order view unavailable"
            );
            json!({"unavailable": true})
        }
        Err(e) => {
            tracing::warn!(upstream = upstream.name(), error = %e, "part of the order view unavailable");
            json!({"unavailable": true})
        }
    }
}

/// `GET /api/orders/{id}`: the order with its reservations, payments and timeline, fetched in
/// parallel. A part whose service fails is `{"unavailable": true}`; the order itself is required.
pub async fn view(
    State(gw): State<Arc<Gateway>>,
    Customer(customer): Customer,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Response {
    let Some(id) = order_id(&id) else {
        return not_found(&id);
    };
    let h = api_headers(&headers);
    // All four at once; the parts are dropped unless the order turns out to be the customer's.
    let calls = [
        Call::get(format!("/orders/{id}"), h.clone()),
        Call::get(format!("/reservations?order_id={id}&limit=1000"), h.clone()),
        Call::get(format!("/payments?order_id={id}&limit=1000"), h.clone()),
        Call::get(format!("/orders/{id}/timeline"), h),
    ];
    let (order, reservations, payments, timeline) = tokio::join!(
        gw.order.send(&calls[0]),
        gw.inventory.send(&calls[1]),
        gw.payment.send(&calls[2]),
        gw.order.send(&calls[3]),
    );
    let order = match owned(order, &gw, &customer, id) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let items = |v: Value| {
        v.get("items")
            .cloned()
            .unwrap_or(json!({"unavailable": true}))
    };
    Json(json!({
        "order": order,
        "reservations": part(&gw.inventory, reservations, items),
        "payments": part(&gw.payment, payments, items),
        "timeline": part(&gw.order, timeline, |v| v),
    }))
    .into_response()
}

/// `POST /api/orders/{id}/cancel`, for the customer's own orders.
pub async fn cancel(
    State(gw): State<Arc<Gateway>>,
    Customer(customer): Customer,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Response {
    let Some(id) = order_id(&id) else {
        return not_found(&id);
    };
    let h = api_headers(&headers);
    let order = gw
        .order
        .send(&Call::get(format!("/orders/{id}"), h.clone()))
        .await;
    if let Err(r) = owned(order, &gw, &customer, id) {
        return r;
    }
    let call = Call {
        method: Method::POST,
        path: format!("/orders/{id}/cancel"),
        idempotent: h.contains_key("idempotency-key"),
        headers: h,
        body: Bytes::new(),
    };
    match gw.order.send(&call).await {
        Ok(answer) => pass_on(answer, None),
        Err(e) => call_problem(&gw.order, e),
    }
}

/// Idempotent by HTTP's definition, or made so by an `Idempotency-Key`.
fn idempotent(method: &Method, headers: &HeaderMap) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    ) || headers.contains_key("idempotency-key")
}

/// Anything else: a routed prefix (`GATEWAY_ROUTES`) goes to its backend with the prefix taken
/// off and everything but hop-by-hop headers kept, both ways; no customer token is required
/// (the backend keeps its own rules). Otherwise 404.
pub async fn proxy(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let Some((prefix, upstream)) = gw.routes.iter().find(|(p, _)| {
        path == *p
            || path
                .strip_prefix(p.as_str())
                .is_some_and(|r| r.starts_with('/'))
    }) else {
        return Problem::not_found("no such resource").into_response();
    };
    let rest = &path[prefix.len()..];
    let mut target = if rest.is_empty() {
        "/".to_owned()
    } else {
        rest.to_owned()
    };
    if let Some(q) = req.uri().query() {
        target = format!("{target}?{q}");
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "body larger than 64 KiB",
            )
            .into_response()
        }
    };
    let mut headers = parts.headers.clone();
    for h in HOP_BY_HOP.iter().chain(&["content-length"]) {
        headers.remove(*h);
    }
    if let Ok(v) = HeaderValue::from_str(prefix) {
        headers.insert("x-forwarded-prefix", v);
    }
    let call = Call {
        idempotent: idempotent(&parts.method, &parts.headers),
        method: parts.method,
        path: target,
        headers,
        body,
    };
    match upstream.send(&call).await {
        Ok(answer) => {
            let mut r = Response::new(Body::from(answer.body));
            *r.status_mut() = answer.status;
            for (name, value) in &answer.headers {
                if !HOP_BY_HOP.contains(&name.as_str()) && name != header::CONTENT_LENGTH {
                    r.headers_mut().append(name.clone(), value.clone());
                }
            }
            r
        }
        Err(e) => call_problem(upstream, e),
    }
}

/// A customer id or SKU, as every service accepts it.
const IDENTIFIER: &str = "^[A-Za-z0-9_.:@-]{1,64}$";

/// `GET /openapi.json`: every answer of the gateway, its own and those it passes on.
pub async fn openapi() -> Json<Value> {
    let problem = |description: &str| {
        json!({"description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
    };
    let json_of = |description: &str, schema: &str| {
        json!({"description": description,
            "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
    };
    // Every customer route: the token, the rate limit, and the upstream's resilience.
    let customer_errors = json!({
        "401": problem("Missing, invalid or expired token"),
        "429": problem("Rate limited; retry after `Retry-After` seconds"),
        "502": problem("The order service could not be reached"),
        "503": problem("Circuit open, bulkhead full, or the order service overloaded; retry after `Retry-After`"),
        "504": problem("The order service did not answer in time"),
    });
    let with = |extra: Value| {
        let mut r = customer_errors.clone();
        if let (Some(r), Some(e)) = (r.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        r
    };
    let id = json!({"name": "id", "in": "path", "required": true,
        "description": "Order id (UUID)", "schema": {"type": "string"}});
    let order_list = json!({"type": "array", "items": {"type": "object"}});
    let unavailable = json!({"$ref": "#/components/schemas/Unavailable"});
    Json(json!({
        "openapi": "3.1.0",
        "info": {"title": "api-gateway", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Customer API in front of the order saga services"},
        "components": {
            "securitySchemes": {"customer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "HS256; `sub` is the customer id"}},
            "schemas": {
                "Problem": {"type": "object", "required": ["type", "title", "status"],
                    "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                        "status": {"type": "integer"}, "detail": {"type": "string"}}},
                "Order": {"type": "object", "required": ["id", "customer_id", "status"],
                    "description": "As the order service serves it",
                    "properties": {"id": {"type": "string"}, "customer_id": {"type": "string"},
                        "status": {"type": "string", "enum": ["PENDING", "RESERVED", "CONFIRMED", "CANCELLED"]}}},
                "OrderPage": {"type": "object", "required": ["items", "next"],
                    "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Order"}},
                        "next": {"type": ["string", "null"], "description": "Cursor of the next page (`after`)"}}},
                "Unavailable": {"type": "object", "required": ["unavailable"],
                    "description": "This part's service failed or timed out",
                    "properties": {"unavailable": {"const": true}}},
                "OrderView": {"type": "object", "required": ["order", "reservations", "payments", "timeline"],
                    "properties": {
                        "order": {"$ref": "#/components/schemas/Order"},
                        "reservations": {"oneOf": [order_list, unavailable]},
                        "payments": {"oneOf": [order_list, unavailable]},
                        "timeline": {"type": "object", "description": "The order's timeline, or `{\"unavailable\": true}`"}}},
                "PlaceOrder": {"type": "object", "required": ["currency", "items"], "additionalProperties": false,
                    "properties": {
                        "customer_id": {"type": "string", "pattern": IDENTIFIER,
                            "description": "The token's customer, or absent"},
                        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                        "items": {"type": "array", "minItems": 1, "maxItems": 100, "items": {"type": "object",
                            "required": ["sku", "quantity", "unit_price_minor"], "additionalProperties": false,
                            "properties": {"sku": {"type": "string", "pattern": IDENTIFIER},
                                "quantity": {"type": "integer", "minimum": 1},
                                "unit_price_minor": {"type": "integer", "minimum": 0}}}}}}
            }
        },
        "security": [{"customer": []}],
        "paths": {
            "/api/orders": {
                "post": {"summary": "Place an order for the authenticated customer",
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"},
                        "description": "Makes retries safe (1-200 visible ASCII characters)"}],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PlaceOrder"}}}},
                    "responses": with(json!({
                        "202": {"description": "Accepted: the saga runs (or ran) for this order",
                            "headers": {"Location": {"description": "The order's URL", "schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}},
                        "400": problem("Malformed JSON or a bad Idempotency-Key"),
                        "403": problem("customer_id is another customer"),
                        "413": problem("Body larger than 64 KiB"),
                        "415": problem("Content-Type is not application/json"),
                        "422": problem("Invalid order, or the Idempotency-Key was used with another body")}))},
                "get": {"summary": "The customer's orders, newest first, a page at a time",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string", "enum": ["PENDING", "RESERVED", "CONFIRMED", "CANCELLED"]}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                        {"name": "after", "in": "query", "description": "The `next` of the previous page", "schema": {"type": "string"}}],
                    "responses": with(json!({
                        "200": json_of("A page of the customer's orders", "OrderPage"),
                        "400": problem("Bad `status`, `limit` or `after`, or a repeated parameter")}))}
            },
            "/api/orders/{id}": {"get": {"summary": "The order with its reservations, payments and timeline",
                "parameters": [id],
                "responses": with(json!({
                    "200": json_of("A part whose service failed is {\"unavailable\": true}", "OrderView"),
                    "400": problem("A path segment is not valid UTF-8 once decoded"),
                    "404": problem("No such order of this customer")}))}},
            "/api/orders/{id}/cancel": {"post": {"summary": "Cancel the customer's order",
                "parameters": [id],
                "responses": with(json!({
                    "200": json_of("Already cancelled", "Order"),
                    "202": json_of("Cancelling: the saga releases what it holds", "Order"),
                    "400": problem("A path segment is not valid UTF-8 once decoded"),
                    "404": problem("No such order of this customer"),
                    "409": problem("Confirmed: it can no longer be cancelled")}))}},
            "/healthz": {"get": {"security": [], "responses": {"200": {"description": "Alive",
                "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/readyz": {"get": {"security": [], "responses": {
                "200": {"description": "The order service is reachable; circuits and replicas of every upstream",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
                "503": {"description": "Not ready", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/metrics": {"get": {"security": [], "responses": {"200": {"description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
        }
    }))
}
