//! Customer authentication (HS256 bearer tokens whose `sub` is the customer id) and the
//! per-customer rate limit.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use event_toolkit::http::Problem;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::Gateway;

/// Claims of a customer token.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The customer id.
    pub sub: String,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
    /// Issued at.
    pub iat: i64,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A token for `customer`, valid for `ttl_secs` from now (negative: already expired, for tests).
pub fn mint(
    secret: &[u8],
    customer: &str,
    ttl_secs: i64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let iat = now_secs();
    let claims = Claims {
        sub: customer.to_owned(),
        exp: iat + ttl_secs,
        iat,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}

/// A customer id as the order service accepts it.
pub fn valid_customer(id: &str) -> bool {
    event_toolkit::ids::valid_identifier(id)
}

/// Verifies tokens and limits each customer's rate.
pub struct Auth {
    key: DecodingKey,
    validation: Validation,
    limiter: DefaultKeyedRateLimiter<String>,
}

impl Auth {
    /// HS256 with `secret`, `leeway_secs` of clock skew on `exp`; `per_sec` requests per second
    /// per customer with bursts of `burst`.
    pub fn new(secret: &[u8], leeway_secs: u64, per_sec: u32, burst: u32) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_secs;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let quota = Quota::per_second(NonZeroU32::new(per_sec).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
            limiter: RateLimiter::keyed(quota),
        }
    }

    /// The customer a bearer token names, if it is valid.
    pub fn verify(&self, token: &str) -> Result<String, &'static str> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the token has expired",
                _ => "the token is not valid",
            },
        )?;
        if !valid_customer(&data.claims.sub) {
            return Err("the token's subject is not a customer id");
        }
        Ok(data.claims.sub)
    }

    /// Take one request from the customer's allowance; `Err(wait)` when it is spent.
    pub fn admit(&self, customer: &str) -> Result<(), Duration> {
        self.limiter
            .check_key(&customer.to_owned())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forget customers whose allowance is full again (bounds the limiter's memory).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// The authenticated customer of a request, admitted by the rate limiter.
#[derive(Debug, Clone)]
pub struct Customer(pub String);

/// 401 with `WWW-Authenticate`.
fn unauthorized(detail: &str) -> Response {
    let mut r = Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"orders\""),
    );
    r
}

impl FromRequestParts<Arc<Gateway>> for Customer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        gw: &Arc<Gateway>,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| unauthorized("a bearer token is required"))?;
        let customer = gw.auth.verify(token).map_err(unauthorized)?;
        if let Err(wait) = gw.auth.admit(&customer) {
            metrics::counter!("gateway_rate_limited_total").increment(1);
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut r = Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                format!("too many requests; retry in {secs} s"),
            )
            .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            return Err(r);
        }
        Ok(Customer(customer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"unit-test-secret-unit-test-secret";

    #[test]
    fn tokens_round_trip_and_expire() {
        let auth = Auth::new(SECRET, 0, 10, 10);
        let token = mint(SECRET, "alice", 60).expect("mint");
        assert_eq!(auth.verify(&token).as_deref(), Ok("alice"));
        let expired = mint(SECRET, "alice", -10).expect("mint");
        assert_eq!(auth.verify(&expired), Err("the token has expired"));
        let other = mint(b"another-secret-another-secret-xx", "alice", 60).expect("mint");
        assert_eq!(auth.verify(&other), Err("the token is not valid"));
        let odd = mint(SECRET, "not a customer", 60).expect("mint");
        assert!(auth.verify(&odd).is_err());
    }

    #[test]
    fn each_customer_has_an_allowance() {
        let auth = Auth::new(SECRET, 0, 1, 2);
        assert!(auth.admit("alice").is_ok());
        assert!(auth.admit("alice").is_ok());
        let wait = auth.admit("alice").expect_err("spent");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(auth.admit("bob").is_ok());
    }
}
