//! HTTP API of the inventory service.

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::{Json, Router};
use event_toolkit::auth::AdminAuth;
use event_toolkit::http::{ApiJson, Problem};
use event_toolkit::Database;
use serde::Deserialize;
use utoipa::OpenApi;

use crate::domain::valid_sku;
use crate::store::{self, Product, Reservation};

/// Routes of this service (probes are added by the toolkit).
/// Setting stock is an admin (seeding) route: it needs the admin token.
pub fn router(db: Database, admin: &AdminAuth) -> Router {
    Router::new()
        .route("/products", get(list_products))
        .route(
            "/products/{sku}",
            get(get_product).merge(admin.protect(put(put_product))),
        )
        .route("/reservations", get(list_reservations))
        .route("/openapi.json", get(openapi))
        .with_state(db)
}

/// `PUT /products/{sku}` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStock {
    /// Units available to reserve (≥ 0).
    pub available: i64,
}

fn sku_or_404(sku: &str) -> Result<(), Problem> {
    if valid_sku(sku) {
        Ok(())
    } else {
        Err(Problem::not_found(format!("no product {sku:?}")))
    }
}

/// Set a product's available stock, creating the product if needed.
#[utoipa::path(put, path = "/products/{sku}", request_body = SetStock,
    responses((status = 200, body = Product), (status = 400, body = Problem), (status = 422, body = Problem)))]
async fn put_product(
    State(db): State<Database>,
    Path(sku): Path<String>,
    ApiJson(body): ApiJson<SetStock>,
) -> Result<Json<Product>, Problem> {
    if !valid_sku(&sku) {
        return Err(Problem::unprocessable(
            "sku must be 1-64 characters of letters, digits, '-', '_', '.', ':' or '@'",
        ));
    }
    if !(0..=1_000_000_000_000).contains(&body.available) {
        return Err(Problem::unprocessable(
            "available must be between 0 and 10^12",
        ));
    }
    let mut tx = db.begin().await?;
    let product = store::set_available(&mut tx, &sku, body.available).await?;
    tx.commit().await?;
    Ok(Json(product))
}

/// One product's stock.
#[utoipa::path(get, path = "/products/{sku}", responses((status = 200, body = Product), (status = 404, body = Problem)))]
async fn get_product(
    State(db): State<Database>,
    Path(sku): Path<String>,
) -> Result<Json<Product>, Problem> {
    sku_or_404(&sku)?;
    store::get_product(db.pool(), &sku)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no product {sku:?}")))
}

/// All products.
#[utoipa::path(get, path = "/products", responses((status = 200, body = Vec<Product>)))]
async fn list_products(State(db): State<Database>) -> Result<Json<Vec<Product>>, Problem> {
    Ok(Json(store::list_products(db.pool()).await?))
}

/// `GET /reservations` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ReservationQuery {
    /// The order.
    order_id: Option<String>,
}

/// The lines reserved for an order.
#[utoipa::path(get, path = "/reservations", params(ReservationQuery),
    responses((status = 200, body = Vec<Reservation>), (status = 400, body = Problem)))]
async fn list_reservations(
    State(db): State<Database>,
    Query(q): Query<ReservationQuery>,
) -> Result<Json<Vec<Reservation>>, Problem> {
    let order_id = q
        .order_id
        .filter(|o| !o.is_empty() && o.len() <= 64)
        .ok_or_else(|| {
            Problem::bad_request("order_id query parameter (1-64 characters) is required")
        })?;
    Ok(Json(store::reservations(db.pool(), &order_id).await?))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "inventory-service",
        description = "Products, stock and reservations"
    ),
    paths(put_product, get_product, list_products, list_reservations),
    components(schemas(Problem, Product, Reservation, SetStock))
)]
struct ApiDoc;

async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}
