//! HTTP API of the payment service.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::{Json, Router};
use event_toolkit::auth::AdminAuth;
use event_toolkit::http::{
    bad_cursor, ApiJson, ApiPath, ApiQuery, Page, PageQuery, Problem, PROBLEM_JSON,
};
use event_toolkit::Database;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::gateway::{CircuitState, GatewayMode, ProviderLedger, SimulatedGateway};
use crate::store::{self, Account, AccountError, Payment};

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Storage.
    pub db: Database,
    /// The simulated provider, switchable for demos and tests.
    pub gateway: Arc<SimulatedGateway>,
}

/// Routes of this service (probes are added by the toolkit).
/// Setting balances and switching the provider are admin routes: they need the admin token.
pub fn router(state: AppState, admin: &AdminAuth) -> Router {
    Router::new()
        .route(
            "/accounts/{customer_id}",
            get(get_account).merge(admin.protect(put(put_account))),
        )
        .route("/payments", get(list_payments))
        .route(
            "/admin/gateway",
            admin.protect(put(put_gateway).get(get_gateway)),
        )
        .route("/admin/provider/ledger", admin.protect(get(get_ledger)))
        .route("/openapi.json", get(openapi))
        .with_state(state)
}

/// `PUT /accounts/{customer_id}` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAccount {
    /// Balance in minor units (≥ 0).
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64)]
    pub balance_minor: i64,
    /// Three capital letters.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
}

fn valid_customer(id: &str) -> bool {
    event_toolkit::ids::valid_identifier(id)
}

/// Set a customer's balance, creating the account.
#[utoipa::path(put, path = "/accounts/{customer_id}", request_body = SetAccount, security(("admin_token" = [])),
    params(("customer_id" = String, Path, pattern = "^[A-Za-z0-9_.:@-]{1,64}$",
        description = "1-64 letters, digits, '-', '_', '.', ':' or '@'")),
    responses(
        (status = 200, description = "The account with its new balance", body = Account),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "The account exists in another currency", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "Bad customer id, balance or currency", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn put_account(
    State(state): State<AppState>,
    ApiPath(customer_id): ApiPath<String>,
    ApiJson(body): ApiJson<SetAccount>,
) -> Result<Json<Account>, Problem> {
    if !valid_customer(&customer_id) {
        return Err(Problem::unprocessable(
            "customer_id must be 1-64 characters of letters, digits, '-', '_', '.', ':' or '@'",
        ));
    }
    if !(0..=1_000_000_000_000_000).contains(&body.balance_minor) {
        return Err(Problem::unprocessable(
            "balance_minor must be between 0 and 10^18",
        ));
    }
    if !event_toolkit::ids::valid_currency(&body.currency) {
        return Err(Problem::unprocessable(
            "currency must be three capital letters",
        ));
    }
    let mut tx = state.db.begin().await?;
    match store::set_account(&mut tx, &customer_id, body.balance_minor, &body.currency).await {
        Ok(a) => {
            tx.commit().await?;
            Ok(Json(a))
        }
        Err(AccountError::CurrencyChange(..)) => {
            Err(Problem::conflict("an account's currency cannot change"))
        }
        Err(AccountError::Db(e)) => Err(e.into()),
    }
}

/// One account.
#[utoipa::path(get, path = "/accounts/{customer_id}",
    params(("customer_id" = String, Path, description = "The customer")),
    responses(
        (status = 200, description = "The account", body = Account),
        (status = 404, description = "No such account", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn get_account(
    State(state): State<AppState>,
    ApiPath(customer_id): ApiPath<String>,
) -> Result<Json<Account>, Problem> {
    if !valid_customer(&customer_id) {
        return Err(Problem::not_found(format!("no account {customer_id:?}")));
    }
    store::get_account(state.db.pool(), &customer_id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no account {customer_id:?}")))
}

/// `GET /payments` filter (paging is [`PageQuery`]).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PaymentQuery {
    /// The order (required).
    #[param(required = true, min_length = 1, max_length = 64)]
    order_id: Option<String>,
}

/// An order's payments (at most one), a page at a time like every list.
#[utoipa::path(get, path = "/payments", params(PaymentQuery, PageQuery),
    responses(
        (status = 200, description = "A page of the order's payments", body = Page<Payment>),
        (status = 400, description = "Missing `order_id`, or bad `limit` or `after`", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn list_payments(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<PaymentQuery>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Payment>>, Problem> {
    let order_id = event_toolkit::http::required_param(q.order_id, "order_id")?;
    let limit = page.limit()?;
    // The cursor is the last order id of a page.
    let after = match page.after() {
        Some(a) if a.len() > 64 => return Err(bad_cursor()),
        after => after,
    };
    let rows = store::payments_for(state.db.pool(), &order_id, after, limit + 1).await?;
    Ok(Json(Page::from_rows(rows, limit, |p| p.order_id.clone())))
}

/// `PUT /admin/gateway` body and `GET` answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewaySetting {
    /// ok, decline or outage.
    pub mode: GatewayMode,
}

/// Switch the simulated provider.
#[utoipa::path(put, path = "/admin/gateway", request_body = GatewaySetting, security(("admin_token" = [])),
    responses(
        (status = 200, description = "The provider's new mode", body = GatewaySetting),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "Unknown mode", body = Problem, content_type = PROBLEM_JSON),
    ))]
async fn put_gateway(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<GatewaySetting>,
) -> Json<GatewaySetting> {
    state.gateway.set_mode(body.mode);
    tracing::info!(mode = ?body.mode, "simulated provider switched");
    Json(GatewaySetting {
        mode: state.gateway.mode(),
    })
}

/// `GET /admin/gateway` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GatewayStatus {
    /// ok, decline or outage.
    pub mode: GatewayMode,
    /// The circuit breaker in front of the provider: closed, open or half_open.
    pub circuit: CircuitState,
}

/// The simulated provider's mode and the circuit in front of it.
#[utoipa::path(get, path = "/admin/gateway", security(("admin_token" = [])),
    responses((status = 200, description = "Mode and circuit state", body = GatewayStatus)))]
async fn get_gateway(State(state): State<AppState>) -> Json<GatewayStatus> {
    Json(GatewayStatus {
        mode: state.gateway.mode(),
        circuit: state.gateway.circuit(),
    })
}

/// What the simulated provider authorized, captured and voided since the service started.
#[utoipa::path(get, path = "/admin/provider/ledger", security(("admin_token" = [])),
    responses((status = 200, description = "The provider's counts", body = ProviderLedger)))]
async fn get_ledger(State(state): State<AppState>) -> Json<ProviderLedger> {
    Json(state.gateway.ledger())
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "payment-service",
        description = "Accounts, payments and refunds"
    ),
    paths(
        put_account,
        get_account,
        list_payments,
        put_gateway,
        get_gateway,
        get_ledger
    ),
    components(schemas(
        Problem,
        Account,
        Payment,
        SetAccount,
        GatewaySetting,
        GatewayStatus,
        GatewayMode,
        CircuitState,
        ProviderLedger
    ))
)]
struct ApiDoc;

async fn openapi() -> impl IntoResponse {
    Json(event_toolkit::http::document(ApiDoc::openapi()))
}
