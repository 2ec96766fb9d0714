//! HTTP API of the payment service.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::{Json, Router};
use event_toolkit::auth::AdminAuth;
use event_toolkit::http::{ApiJson, Problem};
use event_toolkit::Database;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::gateway::{CircuitState, GatewayMode, SimulatedGateway};
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
        .route("/openapi.json", get(openapi))
        .with_state(state)
}

/// `PUT /accounts/{customer_id}` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAccount {
    /// Balance in minor units (≥ 0).
    pub balance_minor: i64,
    /// Three capital letters.
    pub currency: String,
}

fn valid_customer(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
}

/// Set a customer's balance, creating the account.
#[utoipa::path(put, path = "/accounts/{customer_id}", request_body = SetAccount,
    responses((status = 200, body = Account), (status = 409, body = Problem), (status = 422, body = Problem)))]
async fn put_account(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
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
    if body.currency.len() != 3 || !body.currency.bytes().all(|b| b.is_ascii_uppercase()) {
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
#[utoipa::path(get, path = "/accounts/{customer_id}", responses((status = 200, body = Account), (status = 404, body = Problem)))]
async fn get_account(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
) -> Result<Json<Account>, Problem> {
    if !valid_customer(&customer_id) {
        return Err(Problem::not_found(format!("no account {customer_id:?}")));
    }
    store::get_account(state.db.pool(), &customer_id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no account {customer_id:?}")))
}

/// `GET /payments` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct PaymentQuery {
    /// The order.
    order_id: Option<String>,
}

/// An order's payments.
#[utoipa::path(get, path = "/payments", params(PaymentQuery), responses((status = 200, body = Vec<Payment>), (status = 400, body = Problem)))]
async fn list_payments(
    State(state): State<AppState>,
    Query(q): Query<PaymentQuery>,
) -> Result<Json<Vec<Payment>>, Problem> {
    let order_id = q
        .order_id
        .filter(|o| !o.is_empty() && o.len() <= 64)
        .ok_or_else(|| {
            Problem::bad_request("order_id query parameter (1-64 characters) is required")
        })?;
    Ok(Json(store::payments_for(state.db.pool(), &order_id).await?))
}

/// `PUT /admin/gateway` body and `GET` answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewaySetting {
    /// ok, decline or outage.
    pub mode: GatewayMode,
}

/// Switch the simulated provider.
#[utoipa::path(put, path = "/admin/gateway", request_body = GatewaySetting,
    responses((status = 200, body = GatewaySetting), (status = 422, body = Problem)))]
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
#[utoipa::path(get, path = "/admin/gateway", responses((status = 200, body = GatewayStatus)))]
async fn get_gateway(State(state): State<AppState>) -> Json<GatewayStatus> {
    Json(GatewayStatus {
        mode: state.gateway.mode(),
        circuit: state.gateway.circuit(),
    })
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "payment-service",
        description = "Accounts, payments and refunds"
    ),
    paths(put_account, get_account, list_payments, put_gateway, get_gateway),
    components(schemas(
        Problem,
        Account,
        Payment,
        SetAccount,
        GatewaySetting,
        GatewayStatus,
        GatewayMode,
        CircuitState
    ))
)]
struct ApiDoc;

async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}
