//! One upstream (a service or a routed backend) and its replicas, behind the protections of a
//! remote call: a per-attempt timeout, retries with exponential backoff and jitter for idempotent
//! requests, a circuit breaker, a bulkhead, round-robin balancing over the replicas that are up,
//! passive ejection of failing replicas and, for the saga services, `/readyz` polling.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method, StatusCode};
use bytes::Bytes;
use failsafe::futures::CircuitBreaker;
use failsafe::{backoff, failure_policy, Config as BreakerConfig, StateMachine};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{Resilience, UpstreamSpec};

/// A request to an upstream.
#[derive(Debug, Clone)]
pub struct Call {
    /// Method.
    pub method: Method,
    /// Path and query, appended to the replica's base URL.
    pub path: String,
    /// Headers to send (already filtered).
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// May be sent more than once (GET, or POST with an `Idempotency-Key`).
    pub idempotent: bool,
}

impl Call {
    /// A `GET` with these headers.
    pub fn get(path: impl Into<String>, headers: HeaderMap) -> Self {
        Self {
            method: Method::GET,
            path: path.into(),
            headers,
            body: Bytes::new(),
            idempotent: true,
        }
    }
}

/// An upstream's answer, read in full.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON, if it is.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Why no answer came back.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The circuit is open: refused without trying.
    #[error("circuit open")]
    CircuitOpen {
        /// Time left before a trial call is let through.
        retry_after: Duration,
    },
    /// The bulkhead is full: refused without trying.
    #[error("too many calls in flight")]
    Bulkhead,
    /// Every attempt timed out (the last one did).
    #[error("timed out")]
    Timeout,
    /// The upstream could not be reached or broke the connection.
    #[error("unreachable: {0}")]
    Unreachable(String),
}

/// One failed attempt.
#[derive(Debug)]
enum Failure {
    /// A 5xx answer: a failure for the breaker, passed on if it is the last.
    Status(Answer),
    Timeout,
    /// `connect`: nothing reached the upstream, so any request may be sent again.
    Transport {
        connect: bool,
        message: String,
    },
}

/// The breaker's state as last recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls pass.
    Closed,
    /// The wait is over: the next call is a trial.
    HalfOpen,
    /// Calls are refused at once.
    Open,
}

impl CircuitState {
    fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }
}

#[derive(Debug)]
struct Watched {
    state: CircuitState,
    open_until: Instant,
    open_for: Duration,
}

/// A breaker's transitions, recorded as they happen so `/readyz` and `/metrics` can show them.
#[derive(Debug, Clone)]
struct CircuitWatch {
    upstream: String,
    inner: Arc<Mutex<Watched>>,
}

impl CircuitWatch {
    fn with<T>(&self, f: impl FnOnce(&mut Watched) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The breaker turns half-open lazily, on the first call after its wait; this reports it as
    /// soon as the wait is over, which is when that call would be let through.
    fn state(&self) -> CircuitState {
        self.with(|w| match w.state {
            CircuitState::Open if Instant::now() >= w.open_until => CircuitState::HalfOpen,
            s => s,
        })
    }

    fn retry_after(&self) -> Duration {
        self.with(|w| w.open_until.saturating_duration_since(Instant::now()))
    }

    fn gauge(&self, value: f64) {
        metrics::gauge!("gateway_circuit_state", "upstream" => self.upstream.clone()).set(value);
    }
}

impl failsafe::Instrument for CircuitWatch {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        self.with(|w| {
            w.state = CircuitState::Open;
            w.open_until = Instant::now() + w.open_for;
        });
        tracing::warn!(upstream = %self.upstream, "circuit opened");
        self.gauge(2.0);
    }

    fn on_half_open(&self) {
        self.with(|w| w.state = CircuitState::HalfOpen);
        self.gauge(1.0);
    }

    fn on_closed(&self) {
        self.with(|w| w.state = CircuitState::Closed);
        tracing::info!(upstream = %self.upstream, "circuit closed");
        self.gauge(0.0);
    }
}

type Breaker = StateMachine<failure_policy::ConsecutiveFailures<backoff::Constant>, CircuitWatch>;

struct Replica {
    base: String,
    /// Last `/readyz` poll answered 200 (always true when not polled).
    ready: AtomicBool,
    failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl Replica {
    fn ejected(&self) -> bool {
        let until = self.ejected_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|u| Instant::now() < u)
    }

    fn usable(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.ejected()
    }
}

/// An upstream and its replicas.
pub struct Upstream {
    name: String,
    replicas: Vec<Replica>,
    next: AtomicUsize,
    timeout: Duration,
    probe_readyz: bool,
    resilience: Resilience,
    breaker: Breaker,
    watch: CircuitWatch,
    bulkhead: Arc<Semaphore>,
    http: reqwest::Client,
}

impl Upstream {
    /// An upstream from its settings; `http` is shared by all upstreams (one connection pool).
    pub fn new(spec: &UpstreamSpec, resilience: &Resilience, http: reqwest::Client) -> Self {
        let watch = CircuitWatch {
            upstream: spec.name.clone(),
            inner: Arc::new(Mutex::new(Watched {
                state: CircuitState::Closed,
                open_until: Instant::now(),
                open_for: resilience.breaker_open_for,
            })),
        };
        watch.gauge(0.0);
        let policy = failure_policy::consecutive_failures(
            resilience.breaker_failures,
            backoff::constant(resilience.breaker_open_for),
        );
        Self {
            name: spec.name.clone(),
            replicas: spec
                .replicas
                .iter()
                .map(|base| Replica {
                    base: base.clone(),
                    ready: AtomicBool::new(true),
                    failures: AtomicU32::new(0),
                    ejected_until: Mutex::new(None),
                })
                .collect(),
            next: AtomicUsize::new(0),
            timeout: spec.timeout,
            probe_readyz: spec.probe_readyz,
            resilience: resilience.clone(),
            breaker: BreakerConfig::new()
                .failure_policy(policy)
                .instrument(watch.clone())
                .build(),
            watch,
            bulkhead: Arc::new(Semaphore::new(resilience.bulkhead)),
            http,
        }
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Circuit state now.
    pub fn circuit(&self) -> CircuitState {
        self.watch.state()
    }

    /// Some replica is in the rotation and the circuit lets calls through.
    pub fn usable(&self) -> bool {
        self.circuit() != CircuitState::Open && self.replicas.iter().any(Replica::usable)
    }

    /// Circuit and replicas, for `/readyz`.
    pub fn report(&self) -> Value {
        let replicas: Vec<Value> = self
            .replicas
            .iter()
            .map(|r| {
                json!({
                    "url": r.base,
                    "ready": r.ready.load(Ordering::Relaxed),
                    "ejected": r.ejected(),
                    "consecutive_failures": r.failures.load(Ordering::Relaxed),
                })
            })
            .collect();
        json!({
            "circuit": self.circuit().label(),
            "in_flight": self.resilience.bulkhead - self.bulkhead.available_permits(),
            "replicas": replicas,
        })
    }

    /// Round robin over the replicas in the rotation; when none is, over all of them (a guess
    /// beats refusing, and the breaker bounds the cost).
    fn pick(&self) -> &Replica {
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.replicas[(start + i) % n])
            .find(|r| r.usable())
            .unwrap_or(&self.replicas[start % n])
    }

    fn succeeded(&self, r: &Replica) {
        r.failures.store(0, Ordering::Relaxed);
        *r.ejected_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn failed(&self, r: &Replica) {
        let failures = r.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.resilience.eject_failures {
            let mut until = r.ejected_until.lock().unwrap_or_else(|e| e.into_inner());
            if !until.is_some_and(|u| Instant::now() < u) {
                *until = Some(Instant::now() + self.resilience.eject_for);
                tracing::warn!(upstream = %self.name, replica = %r.base, failures, "replica ejected");
                metrics::counter!("gateway_replica_ejections_total", "upstream" => self.name.clone())
                    .increment(1);
            }
        }
    }

    /// Backoff before retry `n` (1-based): doubling from the base, capped, half of it jitter.
    fn backoff(&self, n: usize) -> Duration {
        let exp = self
            .resilience
            .retry_base
            .saturating_mul(1u32 << (n - 1).min(16) as u32)
            .min(self.resilience.retry_max);
        let half = exp.as_millis() as u64 / 2;
        Duration::from_millis(half + rand::random_range(0..=half))
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!("gateway_upstream_requests_total", "upstream" => self.name.clone(), "outcome" => outcome)
            .increment(1);
    }

    /// Send `call` with every protection. A 5xx answer after the last attempt is returned as an
    /// answer (the upstream's own problem); no answer at all is an error.
    pub async fn send(&self, call: &Call) -> Result<Answer, CallError> {
        let Ok(_permit) = self.bulkhead.clone().try_acquire_owned() else {
            self.count("bulkhead_full");
            return Err(CallError::Bulkhead);
        };
        let started = Instant::now();
        let attempts = 1 + self.resilience.retries;
        let mut last = None;
        for attempt in 0..attempts {
            if attempt > 0 {
                metrics::counter!("gateway_upstream_retries_total", "upstream" => self.name.clone())
                    .increment(1);
                tokio::time::sleep(self.backoff(attempt)).await;
            }
            let replica = self.pick();
            let outcome = self
                .breaker
                .call_with(|_: &Failure| true, self.attempt(replica, call))
                .await;
            let failure = match outcome {
                Ok(answer) => {
                    self.succeeded(replica);
                    self.count("ok");
                    metrics::histogram!("gateway_upstream_duration_seconds", "upstream" => self.name.clone())
                        .record(started.elapsed().as_secs_f64());
                    return Ok(answer);
                }
                Err(failsafe::Error::Rejected) => {
                    self.count("circuit_open");
                    return match last {
                        // A 5xx already in hand says more than "circuit open".
                        Some(Failure::Status(answer)) => Ok(answer),
                        _ => Err(CallError::CircuitOpen {
                            retry_after: self.watch.retry_after(),
                        }),
                    };
                }
                Err(failsafe::Error::Inner(f)) => f,
            };
            self.failed(replica);
            let retriable =
                call.idempotent || matches!(failure, Failure::Transport { connect: true, .. });
            self.count(match &failure {
                Failure::Status(_) => "error_status",
                Failure::Timeout => "timeout",
                Failure::Transport { .. } => "unreachable",
            });
            tracing::debug!(upstream = %self.name, replica = %replica.base, attempt, ?failure, "upstream attempt failed");
            last = Some(failure);
            if !retriable {
                break;
            }
        }
        match last {
            Some(Failure::Status(answer)) => Ok(answer),
            Some(Failure::Timeout) => Err(CallError::Timeout),
            Some(Failure::Transport { message, .. }) => Err(CallError::Unreachable(message)),
            None => Err(CallError::Unreachable("no attempt made".into())),
        }
    }

    async fn attempt(&self, replica: &Replica, call: &Call) -> Result<Answer, Failure> {
        let request = self
            .http
            .request(
                call.method.clone(),
                format!("{}{}", replica.base, call.path),
            )
            .headers(call.headers.clone())
            .body(call.body.clone());
        let exchange = async {
            let response = request.send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>(Answer {
                status,
                headers,
                body,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(e)) if e.is_timeout() => Err(Failure::Timeout),
            Ok(Err(e)) => Err(Failure::Transport {
                connect: e.is_connect(),
                message: e.to_string(),
            }),
            Ok(Ok(answer)) if answer.status.is_server_error() => Err(Failure::Status(answer)),
            Ok(Ok(answer)) => Ok(answer),
        }
    }

    /// Poll each replica's `GET /readyz` every `interval` until `shutdown`; a replica that does not
    /// answer 200 leaves the rotation until it does. Does nothing for routed backends.
    pub async fn probe(self: Arc<Self>, shutdown: CancellationToken) {
        let interval = self.resilience.probe_interval;
        if !self.probe_readyz || interval.is_zero() {
            return;
        }
        loop {
            for r in &self.replicas {
                let answer = self
                    .http
                    .get(format!("{}/readyz", r.base))
                    .timeout(self.timeout.min(Duration::from_secs(1)))
                    .send()
                    .await;
                let ready = answer.is_ok_and(|a| a.status() == StatusCode::OK);
                if r.ready.swap(ready, Ordering::Relaxed) != ready {
                    tracing::info!(upstream = %self.name, replica = %r.base, ready, "replica readiness changed");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
