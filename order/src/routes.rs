//! HTTP API of the order service.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use event_toolkit::http::{ApiJson, Problem};
use event_toolkit::{Database, OutboxWaker};
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
        .route("/openapi.json", get(openapi))
        .with_state(state)
}

/// `POST /orders` body.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderRequest {
    /// Who pays.
    pub customer_id: String,
    /// Three-letter currency code.
    pub currency: String,
    /// One or more lines.
    pub items: Vec<LineInput>,
}

/// Place an order: its saga starts. Same `Idempotency-Key` and body → the same order.
#[utoipa::path(post, path = "/orders", request_body = PlaceOrderRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses((status = 202, body = Order), (status = 400, body = Problem), (status = 422, body = Problem)))]
async fn place_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<PlaceOrderRequest>,
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
    let (tx, placed) = loop {
        attempts += 1;
        let mut tx = state.db.begin().await?;
        let placement = Placement {
            order_id: &order_id,
            idempotency_key: key.as_deref(),
            fingerprint: &fingerprint,
            deadline: state.deadline,
            id_may_exist: false,
        };
        match store::place(&mut tx, &state.source, &order, placement, None).await {
            Ok(placed) => break (tx, placed),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempts < 2 => {
                tx.rollback().await?;
            }
            Err(e) => return Err(e.into()),
        }
    };
    match placed {
        Placed::Created(o) => {
            state.waker.commit(tx).await?;
            tracing::info!(order_id = %o.id, total_minor = o.total_minor, "order placed");
            Ok(accepted(o))
        }
        Placed::Existing(o) => {
            tx.rollback().await?;
            Ok(accepted(o))
        }
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
#[utoipa::path(get, path = "/orders/{id}", responses((status = 200, body = Order), (status = 404, body = Problem)))]
async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Order>, Problem> {
    let id = parse_id(&id)?;
    store::get(state.db.pool(), &id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no order {id:?}")))
}

/// `GET /orders` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// PENDING, RESERVED, CONFIRMED or CANCELLED.
    status: Option<String>,
    /// 1-1000, default 100.
    limit: Option<String>,
}

/// Newest orders first.
#[utoipa::path(get, path = "/orders", params(ListQuery), responses((status = 200, body = Vec<Order>), (status = 400, body = Problem)))]
async fn list_orders(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Order>>, Problem> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(OrderStatus::parse(s).ok_or_else(|| {
            Problem::bad_request("status must be PENDING, RESERVED, CONFIRMED or CANCELLED")
        })?),
    };
    let limit = match q.limit.as_deref() {
        None | Some("") => 100,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| Problem::bad_request("limit must be an integer from 1 to 1000"))?,
    };
    Ok(Json(store::list(state.db.pool(), status, limit).await?))
}

/// Cancel: `202` while the saga runs, `200` if already cancelled, `409` once confirmed.
#[utoipa::path(post, path = "/orders/{id}/cancel",
    responses((status = 202, body = Order), (status = 200, body = Order), (status = 404, body = Problem), (status = 409, body = Problem)))]
async fn cancel_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = parse_id(&id)?;
    let mut tx = state.db.begin().await?;
    match store::apply(
        &mut tx,
        &state.source,
        &id,
        Happening::CustomerCancelled,
        None,
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
    paths(place_order, get_order, list_orders, cancel_order),
    components(schemas(
        Problem,
        Order,
        PlaceOrderRequest,
        LineInput,
        OrderStatus,
        crate::domain::CancelReason,
        crate::domain::Line
    ))
)]
struct ApiDoc;

async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}
