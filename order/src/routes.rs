//! HTTP API of the order service.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use event_toolkit::http::{
    bad_cursor, ApiJson, ApiPath, ApiQuery, Page, PageQuery, Problem, PROBLEM_JSON,
};
use event_toolkit::{Context, Database, OutboxWaker, Written};
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;
use uuid::Uuid;

use crate::domain::{Happening, LineInput, NewOrder, OrderStatus};
use crate::store::{self, Applied, Order, Placed, Placement};

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Storage.
    pub db: Database,
    /// Wakes the relay after a commit.
    pub waker: OutboxWaker,
    /// CloudEvents source.
    pub source: String,
    /// Saga deadline.
    pub deadline: Duration,
}

/// Routes of this service (probes are added by the toolkit).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/orders", post(place_order).get(list_orders))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .route("/orders/{id}/timeline", get(crate::timeline::get_timeline))
        .route("/openapi.json", get(openapi))
        .with_state(state)
}

/// `POST /orders` body.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderRequest {
    /// Who pays.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,64}$")]
    pub customer_id: String,
    /// Three-letter currency code.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    /// One or more lines.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<LineInput>,
}

/// Place an order: its saga starts. Same `Idempotency-Key` and body → the same order.
#[utoipa::path(post, path = "/orders", request_body = PlaceOrderRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe (1-200 visible ASCII characters)")),
    responses(
        (status = 202, description = "Accepted: the saga runs (or ran) for this order", body = Order,
            headers(("Location" = String, description = "The order's URL"))),
        (status = 400, description = "Malformed JSON or a bad Idempotency-Key", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "Invalid order, or the Idempotency-Key was used with another body", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn place_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<PlaceOrderRequest>,
) -> Result<Response, Problem> {
    // The saga's trace starts here: a child of the caller's `traceparent`, else a new root.
    let span = event_toolkit::trace::server_span("POST /orders", &headers);
    tracing::Instrument::instrument(place_order_traced(state, headers, req), span).await
}

async fn place_order_traced(
    state: AppState,
    headers: HeaderMap,
    req: PlaceOrderRequest,
) -> Result<Response, Problem> {
    let order = NewOrder::parse(&req.customer_id, &req.currency, &req.items)
        .map_err(Problem::unprocessable)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 200)
                .ok_or_else(|| {
                    Problem::bad_request("Idempotency-Key must be 1-200 visible ASCII characters")
                })?;
            Some(key.to_owned())
        }
    };
    let fingerprint = serde_json::to_string(&req).unwrap_or_default();
    let order_id = Uuid::now_v7().to_string();
    // Two concurrent requests with the same new key: on Postgres the second one's insert hits the
    // unique key; applied again, it finds the first one's order.
    let mut attempts = 0;
    let placed = loop {
        attempts += 1;
        let (order, key, fingerprint, order_id) = (
            order.clone(),
            key.clone(),
            fingerprint.clone(),
            order_id.clone(),
        );
        let (source, deadline) = (state.source.clone(), state.deadline);
        // Committed together with the placements that queue behind the writer meanwhile.
        let placed = state
            .db
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let placement = Placement {
                        order_id: &order_id,
                        idempotency_key: key.as_deref(),
                        fingerprint: &fingerprint,
                        deadline,
                        id_may_exist: false,
                    };
                    let placed =
                        store::place(conn, &Context::request(source), &order, placement).await?;
                    Ok(match placed {
                        Placed::Created(_) => Written::Commit(placed),
                        Placed::Existing(_) | Placed::KeyReused => Written::Rollback(placed),
                    })
                })
            }))
            .await;
        match placed {
            Ok(placed) => break placed,
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempts < 2 => {}
            Err(e) => return Err(e.into()),
        }
    };
    if let Placed::Created(o) | Placed::Existing(o) = &placed {
        tracing::Span::current().record("correlation_id", o.id.as_str());
    }
    match placed {
        Placed::Created(o) => {
            state.waker.wake();
            tracing::info!(order_id = %o.id, total_minor = o.total_minor, "order placed");
            Ok(accepted(o))
        }
        Placed::Existing(o) => Ok(accepted(o)),
        Placed::KeyReused => Err(Problem::unprocessable(
            "Idempotency-Key was already used with a different request",
        )),
    }
}

fn accepted(order: Order) -> Response {
    let location = format!("/orders/{}", order.id);
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(order),
    )
        .into_response()
}

fn parse_id(id: &str) -> Result<String, Problem> {
    Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| Problem::not_found(format!("no order {id:?}")))
}

/// One order.
#[utoipa::path(get, path = "/orders/{id}",
    params(("id" = String, Path, description = "Order id (UUID)")),
    responses(
        (status = 200, description = "The order", body = Order),
        (status = 404, description = "No such order", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn get_order(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Order>, Problem> {
    let id = parse_id(&id)?;
    store::get(state.db.pool(), &id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no order {id:?}")))
}

/// `GET /orders` filter (paging is [`PageQuery`]).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only orders with this status.
    #[param(value_type = Option<OrderStatus>)]
    status: Option<String>,
    /// Only this customer's orders (1-64 characters of letters, digits and `-_.:@`).
    #[param(pattern = "^[A-Za-z0-9_.:@-]{1,64}$")]
    customer_id: Option<String>,
}

/// The cursor of the page after `order`: its creation time (µs) and id. Opaque to clients.
fn order_cursor(order: &Order) -> String {
    format!("{}.{}", order.created_at.timestamp_micros(), order.id)
}

fn parse_order_cursor(after: &str) -> Result<(i64, String), Problem> {
    let (created, id) = after.split_once('.').ok_or_else(bad_cursor)?;
    let created = created.parse::<i64>().map_err(|_| bad_cursor())?;
    let id = Uuid::parse_str(id).map_err(|_| bad_cursor())?;
    Ok((created, id.to_string()))
}

/// Orders, newest first, a page at a time; all of them, or one customer's.
#[utoipa::path(get, path = "/orders", params(ListQuery, PageQuery),
    responses(
        (status = 200, description = "A page of orders; `next` is the cursor of the following page", body = Page<Order>),
        (status = 400, description = "Bad `status`, `customer_id`, `limit` or `after`", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn list_orders(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Order>>, Problem> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(OrderStatus::parse(s).ok_or_else(|| {
            Problem::bad_request("status must be PENDING, RESERVED, CONFIRMED or CANCELLED")
        })?),
    };
    // Empty means "not given", as for `status`.
    let customer =
        match q.customer_id.as_deref() {
            None | Some("") => None,
            Some(c) if event_toolkit::ids::valid_identifier(c) => Some(c),
            Some(_) => return Err(Problem::bad_request(
                "customer_id must be 1-64 characters of letters, digits, '-', '_', '.', ':' or '@'",
            )),
        };
    let limit = page.limit()?;
    let after = page.after().map(parse_order_cursor).transpose()?;
    let after = after.as_ref().map(|(created, id)| (*created, id.as_str()));
    let rows = match customer {
        Some(c) => store::list_by_customer(state.db.pool(), c, status, after, limit + 1).await?,
        None => store::list(state.db.pool(), status, after, limit + 1).await?,
    };
    Ok(Json(Page::from_rows(rows, limit, order_cursor)))
}

/// Cancel: `202` while the saga runs, `200` if already cancelled, `409` once confirmed.
#[utoipa::path(post, path = "/orders/{id}/cancel",
    params(("id" = String, Path, description = "Order id (UUID)")),
    responses(
        (status = 202, description = "Cancelling: the saga releases what it holds", body = Order),
        (status = 200, description = "Already cancelled", body = Order),
        (status = 404, description = "No such order", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "Confirmed: it can no longer be cancelled", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn cancel_order(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    let id = parse_id(&id)?;
    let mut tx = state.db.begin().await?;
    match store::apply(
        &mut tx,
        &Context::request(state.source.as_str()),
        &id,
        Happening::CustomerCancelled,
    )
    .await?
    {
        Applied::NotFound => Err(Problem::not_found(format!("no order {id:?}"))),
        Applied::Decided(crate::domain::Decision::Cancel(_), order) => {
            state.waker.commit(tx).await?;
            Ok((StatusCode::ACCEPTED, Json(order)).into_response())
        }
        Applied::Decided(crate::domain::Decision::Refuse, _) => Err(Problem::conflict(
            "the order is confirmed and can no longer be cancelled",
        )),
        Applied::Decided(_, order) => Ok((StatusCode::OK, Json(order)).into_response()),
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "order-service", description = "Orders and their saga status"),
    paths(
        place_order,
        get_order,
        list_orders,
        cancel_order,
        crate::timeline::get_timeline
    ),
    components(schemas(
        Problem,
        Order,
        PlaceOrderRequest,
        LineInput,
        OrderStatus,
        crate::domain::CancelReason,
        crate::domain::Line,
        crate::timeline::Timeline,
        crate::timeline::TimelineEvent
    ))
)]
struct ApiDoc;

async fn openapi() -> impl IntoResponse {
    Json(event_toolkit::http::document(ApiDoc::openapi()))
}
