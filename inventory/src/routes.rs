//! HTTP API of the inventory service.

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::{Json, Router};
use event_toolkit::auth::AdminAuth;
use event_toolkit::http::{
    bad_cursor, ApiJson, ApiPath, ApiQuery, Page, PageQuery, Problem, PROBLEM_JSON,
};
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
    #[schema(minimum = 0, maximum = 1_000_000_000_000_i64)]
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
#[utoipa::path(put, path = "/products/{sku}", request_body = SetStock, security(("admin_token" = [])),
    params(("sku" = String, Path, pattern = "^[A-Za-z0-9_.:@-]{1,64}$",
        description = "1-64 letters, digits, '-', '_', '.', ':' or '@'")),
    responses(
        (status = 200, description = "The product with its new stock", body = Product),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "Bad SKU or quantity", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn put_product(
    State(db): State<Database>,
    ApiPath(sku): ApiPath<String>,
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
#[utoipa::path(get, path = "/products/{sku}",
    params(("sku" = String, Path, description = "The product's SKU")),
    responses(
        (status = 200, description = "The product", body = Product),
        (status = 404, description = "No such product", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn get_product(
    State(db): State<Database>,
    ApiPath(sku): ApiPath<String>,
) -> Result<Json<Product>, Problem> {
    sku_or_404(&sku)?;
    store::get_product(db.pool(), &sku)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no product {sku:?}")))
}

/// A cursor is the last SKU of a page: it must look like one.
fn sku_cursor(page: &PageQuery) -> Result<Option<&str>, Problem> {
    match page.after() {
        Some(a) if !valid_sku(a) => Err(bad_cursor()),
        after => Ok(after),
    }
}

/// Products by SKU, a page at a time.
#[utoipa::path(get, path = "/products", params(PageQuery),
    responses(
        (status = 200, description = "A page of products; `next` is the cursor of the following page", body = Page<Product>),
        (status = 400, description = "Bad `limit` or `after`", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn list_products(
    State(db): State<Database>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Product>>, Problem> {
    let limit = page.limit()?;
    let rows = store::list_products(db.pool(), sku_cursor(&page)?, limit + 1).await?;
    Ok(Json(Page::from_rows(rows, limit, |p| p.sku.clone())))
}

/// `GET /reservations` filter (paging is [`PageQuery`]).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReservationQuery {
    /// The order (required).
    #[param(required = true, min_length = 1, max_length = 64)]
    order_id: Option<String>,
}

/// The lines reserved for an order, by SKU, a page at a time.
#[utoipa::path(get, path = "/reservations", params(ReservationQuery, PageQuery),
    responses(
        (status = 200, description = "A page of the order's reservations", body = Page<Reservation>),
        (status = 400, description = "Missing `order_id`, or bad `limit` or `after`", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn list_reservations(
    State(db): State<Database>,
    ApiQuery(q): ApiQuery<ReservationQuery>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Reservation>>, Problem> {
    let order_id = event_toolkit::http::required_param(q.order_id, "order_id")?;
    let limit = page.limit()?;
    let rows = store::reservations(db.pool(), &order_id, sku_cursor(&page)?, limit + 1).await?;
    Ok(Json(Page::from_rows(rows, limit, |r| r.sku.clone())))
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
    Json(event_toolkit::http::document(ApiDoc::openapi()))
}
