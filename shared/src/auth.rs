//! Admin and seeding routes behind a bearer token (`ADMIN_TOKEN`).
//!
//! Customer routes stay open (a gateway authenticates customers in front of them); routes that
//! change stock, balances or provider behaviour, or that show dead-lettered payloads, need
//! `Authorization: Bearer <ADMIN_TOKEN>`. A missing or wrong token is 401; a service started
//! without a token answers those routes with 403, so an unconfigured deployment is closed, not open.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::Router;
use subtle::ConstantTimeEq;

use crate::http::Problem;

/// The admin token of a service, or none (admin routes then refuse everyone).
#[derive(Clone, Default)]
pub struct AdminAuth {
    token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl AdminAuth {
    /// Guard with `token`; `None` or an empty string closes the admin routes.
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token
                .filter(|t| !t.is_empty())
                .map(|t| Arc::from(t.into_bytes().into_boxed_slice())),
        }
    }

    /// Whether a token is configured.
    pub fn is_configured(&self) -> bool {
        self.token.is_some()
    }

    /// Check an `Authorization` header value.
    fn admits(&self, authorization: Option<&HeaderValue>) -> Result<(), Problem> {
        let Some(expected) = &self.token else {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "admin-disabled",
                "admin routes are disabled: the service was started without ADMIN_TOKEN",
            ));
        };
        let presented = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            // Constant time over the bytes, so response timing says nothing about a prefix match.
            Some(p) if bool::from(p.as_bytes().ct_eq(expected)) => Ok(()),
            Some(_) => Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the bearer token is not valid for this route",
            )),
            None => Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this route needs `Authorization: Bearer <ADMIN_TOKEN>`",
            )),
        }
    }

    /// `route` admitting only requests with the admin token:
    /// `.route("/products/{sku}", get(read).merge(auth.protect(put(write))))`.
    pub fn protect<S>(&self, route: MethodRouter<S>) -> MethodRouter<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        route.route_layer(axum::middleware::from_fn_with_state(self.clone(), guard))
    }

    /// Every route of `router` admitting only requests with the admin token.
    pub fn protect_all<S>(&self, router: Router<S>) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        router.route_layer(axum::middleware::from_fn_with_state(self.clone(), guard))
    }
}

async fn guard(State(auth): State<AdminAuth>, req: Request, next: Next) -> Response {
    match auth.admits(req.headers().get(header::AUTHORIZATION)) {
        Ok(()) => next.run(req).await,
        Err(problem) => {
            let unauthorized = problem.status == StatusCode::UNAUTHORIZED.as_u16();
            let mut response = problem.into_response();
            if unauthorized {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn only_the_exact_bearer_token_is_admitted() {
        let auth = AdminAuth::new(Some("s3cret-token".into()));
        assert!(auth.admits(Some(&header("Bearer s3cret-token"))).is_ok());
        for wrong in [
            "Bearer s3cret-toke",
            "Bearer s3cret-token2",
            "bearer s3cret-token",
            "s3cret-token",
            "Basic czNjcmV0LXRva2Vu",
            "Bearer ",
        ] {
            let p = auth.admits(Some(&header(wrong))).unwrap_err();
            assert_eq!(p.status, 401, "{wrong}");
        }
        assert_eq!(auth.admits(None).unwrap_err().status, 401);
    }

    #[test]
    fn without_a_token_admin_routes_are_forbidden() {
        for auth in [AdminAuth::new(None), AdminAuth::new(Some(String::new()))] {
            assert!(!auth.is_configured());
            assert_eq!(
                auth.admits(Some(&header("Bearer anything")))
                    .unwrap_err()
                    .status,
                403
            );
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let shown = format!("{:?}", AdminAuth::new(Some("s3cret-token".into())));
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
