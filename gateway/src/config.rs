//! Settings from the environment. A malformed value is an error at start, not a silent default.

use std::time::Duration;

use event_toolkit::edge::EdgeLimits;
use event_toolkit::service::StartError;

/// One upstream: a name (metrics label, `GATEWAY_<NAME>_TIMEOUT_MS`) and its replicas.
#[derive(Debug, Clone)]
pub struct UpstreamSpec {
    /// `order`, `inventory`, `payment`, or a route's prefix without its slashes.
    pub name: String,
    /// Base URLs, one per replica.
    pub replicas: Vec<String>,
    /// Poll each replica's `GET /readyz` (the saga services have one; an arbitrary backend may not).
    pub probe_readyz: bool,
    /// Per-attempt timeout.
    pub timeout: Duration,
}

/// Resilience settings shared by every upstream (each upstream has its own breaker, bulkhead,
/// replicas and counters).
#[derive(Debug, Clone)]
pub struct Resilience {
    /// `GATEWAY_RETRIES`: retries after the first attempt, for idempotent requests only.
    pub retries: usize,
    /// `GATEWAY_RETRY_BASE_MS`: first backoff; doubles each retry, full jitter.
    pub retry_base: Duration,
    /// `GATEWAY_RETRY_MAX_MS`: longest backoff.
    pub retry_max: Duration,
    /// `GATEWAY_BREAKER_FAILURES`: consecutive failed attempts that open an upstream's circuit.
    pub breaker_failures: u32,
    /// `GATEWAY_BREAKER_OPEN_MS`: how long it stays open before a trial call.
    pub breaker_open_for: Duration,
    /// `GATEWAY_BULKHEAD`: calls in flight to one upstream at most; more are refused at once.
    pub bulkhead: usize,
    /// `GATEWAY_EJECT_FAILURES`: consecutive failures that take a replica out of the rotation.
    pub eject_failures: u32,
    /// `GATEWAY_EJECT_MS`: how long an ejected replica stays out.
    pub eject_for: Duration,
    /// `GATEWAY_PROBE_INTERVAL_MS`: `/readyz` polling of the services' replicas (0: off).
    pub probe_interval: Duration,
}

/// Everything the gateway reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// `GATEWAY_ADDR`.
    pub addr: String,
    /// `GATEWAY_JWT_SECRET`.
    pub jwt_secret: Vec<u8>,
    /// `GATEWAY_JWT_LEEWAY_SECS`: clock skew tolerated on `exp`.
    pub jwt_leeway_secs: u64,
    /// `ORDER_UPSTREAMS`.
    pub order: UpstreamSpec,
    /// `INVENTORY_UPSTREAMS`.
    pub inventory: UpstreamSpec,
    /// `PAYMENT_UPSTREAMS`.
    pub payment: UpstreamSpec,
    /// `GATEWAY_ROUTES`: prefix → upstream, passed through as they are.
    pub routes: Vec<(String, UpstreamSpec)>,
    /// Retry, breaker, bulkhead, ejection.
    pub resilience: Resilience,
    /// `GATEWAY_RATE_PER_SEC`: requests per second per customer.
    pub rate_per_sec: u32,
    /// `GATEWAY_RATE_BURST`: requests a customer may send at once.
    pub rate_burst: u32,
    /// `HTTP_*` limits of the edge, as for the services.
    pub edge: EdgeLimits,
}

fn config_error(name: &str, reason: impl Into<String>) -> StartError {
    StartError::Config {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// An integer setting with a default; malformed is an error, not a silent default.
fn env_u64(name: &str, default: u64) -> Result<u64, StartError> {
    match var(name) {
        Some(v) => v
            .trim()
            .parse()
            .map_err(|e| config_error(name, format!("{v:?}: {e}"))),
        None => Ok(default),
    }
}

fn millis(name: &str, default: u64) -> Result<Duration, StartError> {
    Ok(Duration::from_millis(env_u64(name, default)?))
}

fn positive(name: &str, default: u64) -> Result<u64, StartError> {
    match env_u64(name, default)? {
        0 => Err(config_error(name, "must be greater than zero")),
        v => Ok(v),
    }
}

/// Comma-separated `http://host:port[/base]` URLs, trailing slashes dropped.
fn parse_replicas(name: &str, list: &str) -> Result<Vec<String>, StartError> {
    let replicas: Vec<String> = list
        .split(',')
        .map(|r| r.trim().trim_end_matches('/').to_owned())
        .filter(|r| !r.is_empty())
        .collect();
    if replicas.is_empty() {
        return Err(config_error(name, "no upstream URL"));
    }
    for r in &replicas {
        let ok = reqwest::Url::parse(r).is_ok_and(|u| u.scheme() == "http" && u.has_host());
        if !ok {
            return Err(config_error(name, format!("{r:?} is not an http:// URL")));
        }
    }
    Ok(replicas)
}

/// The upstream's timeout: `GATEWAY_<NAME>_TIMEOUT_MS`, else `GATEWAY_TIMEOUT_MS`.
fn timeout_of(name: &str, default: Duration) -> Result<Duration, StartError> {
    let key = format!(
        "GATEWAY_{}_TIMEOUT_MS",
        name.to_uppercase().replace(['-', '/', '.'], "_")
    );
    Ok(Duration::from_millis(positive(
        &key,
        default.as_millis() as u64,
    )?))
}

/// `GATEWAY_ROUTES`: `/prefix=http://a,http://b;/other=http://c`.
pub fn parse_routes(
    text: &str,
    timeout: Duration,
) -> Result<Vec<(String, UpstreamSpec)>, StartError> {
    let mut routes = Vec::new();
    for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (prefix, list) = entry.split_once('=').ok_or_else(|| {
            config_error(
                "GATEWAY_ROUTES",
                format!("{entry:?}: want /prefix=URL[,URL…]"),
            )
        })?;
        let prefix = prefix.trim().trim_end_matches('/');
        let name = prefix.trim_start_matches('/');
        let valid = prefix.starts_with('/')
            && !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_/.".contains(c));
        if !valid {
            return Err(config_error(
                "GATEWAY_ROUTES",
                format!("{prefix:?}: a prefix is /name (letters, digits, - _ . /)"),
            ));
        }
        if prefix == "/api" || prefix.starts_with("/api/") {
            return Err(config_error(
                "GATEWAY_ROUTES",
                "/api belongs to the gateway",
            ));
        }
        routes.push((
            prefix.to_owned(),
            UpstreamSpec {
                name: name.to_owned(),
                replicas: parse_replicas("GATEWAY_ROUTES", list)?,
                probe_readyz: false,
                timeout: timeout_of(name, timeout)?,
            },
        ));
    }
    // Longest prefix first, so `/legacy/v2` wins over `/legacy`.
    routes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    Ok(routes)
}

impl Config {
    /// Read the environment. `GATEWAY_JWT_SECRET` is required: without it no customer could be
    /// authenticated.
    pub fn from_env() -> Result<Self, StartError> {
        let jwt_secret = var("GATEWAY_JWT_SECRET")
            .ok_or_else(|| config_error("GATEWAY_JWT_SECRET", "required (at least 32 bytes)"))?;
        if jwt_secret.len() < 32 {
            return Err(config_error("GATEWAY_JWT_SECRET", "at least 32 bytes"));
        }
        let timeout = Duration::from_millis(positive("GATEWAY_TIMEOUT_MS", 2000)?);
        let service = |name: &str, key: &str, default: &str| -> Result<UpstreamSpec, StartError> {
            Ok(UpstreamSpec {
                name: name.to_owned(),
                replicas: parse_replicas(key, &var(key).unwrap_or_else(|| default.to_owned()))?,
                probe_readyz: true,
                timeout: timeout_of(name, timeout)?,
            })
        };
        Ok(Self {
            addr: var("GATEWAY_ADDR").unwrap_or_else(|| "127.0.0.1:8080".to_owned()),
            jwt_secret: jwt_secret.into_bytes(),
            jwt_leeway_secs: env_u64("GATEWAY_JWT_LEEWAY_SECS", 5)?,
            order: service("order", "ORDER_UPSTREAMS", "http://127.0.0.1:8081")?,
            inventory: service("inventory", "INVENTORY_UPSTREAMS", "http://127.0.0.1:8082")?,
            payment: service("payment", "PAYMENT_UPSTREAMS", "http://127.0.0.1:8083")?,
            routes: parse_routes(&var("GATEWAY_ROUTES").unwrap_or_default(), timeout)?,
            resilience: Resilience {
                retries: env_u64("GATEWAY_RETRIES", 2)? as usize,
                retry_base: millis("GATEWAY_RETRY_BASE_MS", 50)?,
                retry_max: millis("GATEWAY_RETRY_MAX_MS", 1000)?,
                breaker_failures: positive("GATEWAY_BREAKER_FAILURES", 5)? as u32,
                breaker_open_for: Duration::from_millis(positive("GATEWAY_BREAKER_OPEN_MS", 5000)?),
                bulkhead: positive("GATEWAY_BULKHEAD", 64)? as usize,
                eject_failures: positive("GATEWAY_EJECT_FAILURES", 3)? as u32,
                eject_for: Duration::from_millis(positive("GATEWAY_EJECT_MS", 10_000)?),
                probe_interval: millis("GATEWAY_PROBE_INTERVAL_MS", 2000)?,
            },
            rate_per_sec: positive("GATEWAY_RATE_PER_SEC", 20)? as u32,
            rate_burst: positive("GATEWAY_RATE_BURST", 40)? as u32,
            edge: event_toolkit::config::from_env::<EdgeLimits>().map_err(|e| {
                // clap's message names the variable; its first line is the whole story.
                let message = e.to_string();
                let first = message.lines().next().unwrap_or_default();
                config_error("HTTP_*", first.trim_start_matches("error: "))
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_longest_prefix_first_with_replicas() {
        let routes = parse_routes(
            "/legacy=http://127.0.0.1:9000/; /legacy/v2=http://a:1,http://b:2/base",
            Duration::from_secs(1),
        )
        .expect("routes");
        let prefixes: Vec<&str> = routes.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(prefixes, ["/legacy/v2", "/legacy"]);
        assert_eq!(routes[0].1.replicas, ["http://a:1", "http://b:2/base"]);
        assert_eq!(routes[1].1.replicas, ["http://127.0.0.1:9000"]);
        assert_eq!(routes[1].1.name, "legacy");
        assert!(!routes[0].1.probe_readyz);
    }

    #[test]
    fn bad_routes_are_refused() {
        for bad in [
            "legacy=http://a:1",
            "/legacy",
            "/legacy=",
            "/legacy=ftp://a",
            "/api=http://a:1",
            "/api/x=http://a:1",
            "/=http://a:1",
            "/a b=http://a:1",
        ] {
            assert!(
                parse_routes(bad, Duration::from_secs(1)).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(parse_routes("", Duration::from_secs(1))
            .expect("empty")
            .is_empty());
    }
}
