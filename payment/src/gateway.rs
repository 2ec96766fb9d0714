//! The payment provider: a trait, a simulated provider (latency, declines, outages), and the
//! resilience wrapped around any provider — timeout per attempt, retry with exponential backoff and
//! jitter, a circuit breaker, and a bulkhead capping concurrent calls.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use failsafe::futures::CircuitBreaker;
use failsafe::{backoff, failure_policy, Config, StateMachine};
use tokio::sync::Semaphore;

use crate::domain::ProviderAnswer;

/// A charge request.
#[derive(Debug, Clone)]
pub struct Charge {
    /// Idempotency key at the provider: the order id.
    pub key: String,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Currency.
    pub currency: String,
}

/// Why a provider call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The provider refused the charge; retrying will not help.
    #[error("declined by the provider")]
    Declined,
    /// The provider could not be reached or failed; retrying may help.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
}

/// A payment provider.
pub trait PaymentGateway: Send + Sync + 'static {
    /// Charge, idempotently by `charge.key`.
    fn charge(&self, charge: &Charge) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// Where the circuit breaker put in front of this provider records its state, for whoever
    /// reports on the provider. By default nobody looks.
    fn circuit_watch(&self) -> CircuitWatch {
        CircuitWatch::default()
    }
}

/// Where a circuit breaker stands.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls fail fast without reaching the provider.
    Open,
    /// The wait is over: the next call is a trial that closes the circuit or opens it again.
    HalfOpen,
}

#[derive(Debug)]
struct Watched {
    state: CircuitState,
    open_until: Instant,
    open_for: Duration,
}

/// A breaker's transitions as they happen, shared by its clones: the breaker records, an admin
/// endpoint reads.
#[derive(Debug, Clone)]
pub struct CircuitWatch(Arc<Mutex<Watched>>);

impl Default for CircuitWatch {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Watched {
            state: CircuitState::Closed,
            open_until: Instant::now(),
            open_for: Duration::ZERO,
        })))
    }
}

impl CircuitWatch {
    fn with<T>(&self, f: impl FnOnce(&mut Watched) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The state now. The breaker turns half-open lazily, on the first call after its wait; this
    /// reports it as soon as the wait is over, which is when that call would be let through.
    pub fn state(&self) -> CircuitState {
        self.with(|w| match w.state {
            CircuitState::Open if Instant::now() >= w.open_until => CircuitState::HalfOpen,
            s => s,
        })
    }
}

impl failsafe::Instrument for CircuitWatch {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        // Recorded just after the breaker computed its own deadline, so never earlier than it.
        self.with(|w| {
            w.state = CircuitState::Open;
            w.open_until = Instant::now() + w.open_for;
        });
        circuit_gauge(2.0);
    }

    fn on_half_open(&self) {
        self.with(|w| w.state = CircuitState::HalfOpen);
        circuit_gauge(1.0);
    }

    fn on_closed(&self) {
        self.with(|w| w.state = CircuitState::Closed);
        circuit_gauge(0.0);
    }
}

/// Help texts of the provider metrics (after the toolkit's recorder exists).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "payment_provider_calls_total",
        "Calls to the payment provider by outcome (approved, declined, unavailable, timeout, circuit_open)"
    );
    metrics::describe_gauge!(
        "payment_circuit_breaker_state",
        "Circuit breaker in front of the provider: 0 closed, 1 half-open, 2 open"
    );
    metrics::describe_gauge!(
        "payment_bulkhead_in_use",
        "Provider calls holding a bulkhead slot"
    );
}

/// `payment_circuit_breaker_state`: 0 closed, 1 half-open, 2 open.
fn circuit_gauge(state: f64) {
    metrics::gauge!("payment_circuit_breaker_state").set(state);
}

/// How the simulated provider behaves.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum GatewayMode {
    /// Approves (subject to the decline threshold).
    Ok,
    /// Declines everything.
    Decline,
    /// Unreachable: every call fails.
    Outage,
}

/// A stand-in for a third-party provider.
#[derive(Debug, Clone)]
pub struct SimulatedGateway {
    mode: Arc<AtomicU8>,
    latency: Duration,
    decline_over_minor: Option<i64>,
    circuit: CircuitWatch,
}

impl SimulatedGateway {
    /// A provider answering after `latency`, declining amounts above `decline_over_minor`.
    pub fn new(latency: Duration, decline_over_minor: Option<i64>) -> Self {
        Self {
            mode: Arc::new(AtomicU8::new(0)),
            latency,
            decline_over_minor,
            circuit: CircuitWatch::default(),
        }
    }

    /// Switch behaviour (demos and tests).
    pub fn set_mode(&self, mode: GatewayMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// The circuit breaker in front of this provider, as last recorded.
    pub fn circuit(&self) -> CircuitState {
        self.circuit.state()
    }

    /// Current behaviour.
    pub fn mode(&self) -> GatewayMode {
        match self.mode.load(Ordering::SeqCst) {
            1 => GatewayMode::Decline,
            2 => GatewayMode::Outage,
            _ => GatewayMode::Ok,
        }
    }
}

impl PaymentGateway for SimulatedGateway {
    async fn charge(&self, charge: &Charge) -> Result<(), GatewayError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        match self.mode() {
            GatewayMode::Outage => Err(GatewayError::Unavailable("simulated outage".into())),
            GatewayMode::Decline => Err(GatewayError::Declined),
            GatewayMode::Ok => match self.decline_over_minor {
                Some(limit) if charge.amount_minor > limit => Err(GatewayError::Declined),
                _ => Ok(()),
            },
        }
    }

    /// Shared by every clone, so the admin endpoint holding one sees the breaker the processor's
    /// clone sits behind.
    fn circuit_watch(&self) -> CircuitWatch {
        self.circuit.clone()
    }
}

/// Resilience settings.
#[derive(Debug, Clone)]
pub struct ResilienceConfig {
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub retries: usize,
    /// First retry delay (doubles, with jitter).
    pub retry_base: Duration,
    /// Consecutive failures that open the circuit.
    pub breaker_failures: u32,
    /// How long the circuit stays open before a trial call.
    pub breaker_open_for: Duration,
    /// Concurrent provider calls at most.
    pub max_concurrent: usize,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            retries: 3,
            retry_base: Duration::from_millis(50),
            // One charge that exhausts its retries (4 failed attempts) opens the circuit: the
            // provider is down, and the next charges should fail fast instead of waiting.
            breaker_failures: 4,
            breaker_open_for: Duration::from_secs(5),
            max_concurrent: 64,
        }
    }
}

type Breaker = StateMachine<failure_policy::ConsecutiveFailures<backoff::Constant>, CircuitWatch>;

/// Any provider behind timeout, retry, circuit breaker and bulkhead.
pub struct ResilientGateway<G> {
    inner: G,
    config: ResilienceConfig,
    breaker: Breaker,
    bulkhead: Semaphore,
}

impl<G: PaymentGateway> ResilientGateway<G> {
    /// Wrap `inner`.
    pub fn new(inner: G, config: ResilienceConfig) -> Self {
        let policy = failure_policy::consecutive_failures(
            config.breaker_failures,
            backoff::constant(config.breaker_open_for),
        );
        let watch = inner.circuit_watch();
        watch.with(|w| w.open_for = config.breaker_open_for);
        circuit_gauge(0.0);
        metrics::gauge!("payment_bulkhead_in_use").set(0.0);
        Self {
            inner,
            bulkhead: Semaphore::new(config.max_concurrent.max(1)),
            breaker: Config::new()
                .failure_policy(policy)
                .instrument(watch)
                .build(),
            config,
        }
    }

    /// `payment_bulkhead_in_use`: provider calls holding a bulkhead slot.
    fn bulkhead_gauge(&self) {
        let in_use = self.config.max_concurrent.max(1) - self.bulkhead.available_permits();
        metrics::gauge!("payment_bulkhead_in_use").set(in_use as f64);
    }

    /// Whether the circuit currently lets calls through.
    pub fn circuit_closed(&self) -> bool {
        self.breaker.is_call_permitted()
    }

    /// Charge with all protections; maps the outcome to what the saga needs.
    pub async fn charge(&self, charge: &Charge) -> ProviderAnswer {
        let Ok(permit) = self.bulkhead.acquire().await else {
            return ProviderAnswer::Unavailable;
        };
        self.bulkhead_gauge();
        let attempt = || async {
            // Declines are answers, not failures: they must not trip the breaker.
            let call = async {
                let outcome =
                    tokio::time::timeout(self.config.timeout, self.inner.charge(charge)).await;
                let label = match &outcome {
                    Ok(Ok(())) => "approved",
                    Ok(Err(GatewayError::Declined)) => "declined",
                    Ok(Err(GatewayError::Unavailable(_))) => "unavailable",
                    Err(_) => "timeout",
                };
                metrics::counter!("payment_provider_calls_total", "outcome" => label).increment(1);
                match outcome {
                    Ok(r) => r,
                    Err(_) => Err(GatewayError::Unavailable("timed out".into())),
                }
            };
            match self
                .breaker
                .call_with(
                    |e: &GatewayError| matches!(e, GatewayError::Unavailable(_)),
                    call,
                )
                .await
            {
                Ok(()) => Ok(()),
                Err(failsafe::Error::Inner(e)) => Err(e),
                Err(failsafe::Error::Rejected) => {
                    metrics::counter!("payment_provider_calls_total", "outcome" => "circuit_open")
                        .increment(1);
                    Err(GatewayError::Unavailable("circuit open".into()))
                }
            }
        };
        let result = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(self.config.retry_base)
                    .with_max_times(self.config.retries)
                    .with_jitter(),
            )
            // Retry only what may heal; an open circuit fails fast.
            .when(|e| matches!(e, GatewayError::Unavailable(m) if m != "circuit open"))
            .await;
        drop(permit);
        self.bulkhead_gauge();
        match result {
            Ok(()) => ProviderAnswer::Approved,
            Err(GatewayError::Declined) => ProviderAnswer::Declined,
            Err(GatewayError::Unavailable(reason)) => {
                tracing::warn!(key = %charge.key, %reason, "provider unavailable after retries");
                ProviderAnswer::Unavailable
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(amount: i64) -> Charge {
        Charge {
            key: "o1".into(),
            amount_minor: amount,
            currency: "EUR".into(),
        }
    }

    fn fast() -> ResilienceConfig {
        ResilienceConfig {
            timeout: Duration::from_millis(50),
            retries: 2,
            retry_base: Duration::from_millis(1),
            breaker_failures: 3,
            breaker_open_for: Duration::from_secs(60),
            max_concurrent: 4,
        }
    }

    #[tokio::test]
    async fn approves_declines_over_threshold_and_in_decline_mode() {
        let sim = SimulatedGateway::new(Duration::ZERO, Some(1000));
        let g = ResilientGateway::new(sim.clone(), fast());
        assert_eq!(g.charge(&charge(1000)).await, ProviderAnswer::Approved);
        assert_eq!(g.charge(&charge(1001)).await, ProviderAnswer::Declined);
        sim.set_mode(GatewayMode::Decline);
        assert_eq!(g.charge(&charge(1)).await, ProviderAnswer::Declined);
        assert!(g.circuit_closed(), "declines do not open the circuit");
    }

    #[tokio::test]
    async fn an_outage_exhausts_retries_then_opens_the_circuit() {
        let sim = SimulatedGateway::new(Duration::ZERO, None);
        let g = ResilientGateway::new(sim.clone(), fast());
        sim.set_mode(GatewayMode::Outage);
        // First charge: 1 attempt + 2 retries = 3 consecutive failures: the breaker opens.
        assert_eq!(g.charge(&charge(1)).await, ProviderAnswer::Unavailable);
        assert!(!g.circuit_closed());
        assert_eq!(sim.circuit_watch().state(), CircuitState::Open);
        // While open, calls fail fast even if the provider is back.
        sim.set_mode(GatewayMode::Ok);
        assert_eq!(g.charge(&charge(1)).await, ProviderAnswer::Unavailable);
    }

    #[tokio::test]
    async fn the_watch_follows_the_circuit_open_half_open_closed() {
        let sim = SimulatedGateway::new(Duration::ZERO, None);
        let g = ResilientGateway::new(
            sim.clone(),
            ResilienceConfig {
                breaker_open_for: Duration::from_millis(100),
                ..fast()
            },
        );
        assert_eq!(sim.circuit_watch().state(), CircuitState::Closed);
        sim.set_mode(GatewayMode::Outage);
        assert_eq!(g.charge(&charge(1)).await, ProviderAnswer::Unavailable);
        assert_eq!(sim.circuit_watch().state(), CircuitState::Open);
        sim.set_mode(GatewayMode::Ok);
        while sim.circuit_watch().state() == CircuitState::Open {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(sim.circuit_watch().state(), CircuitState::HalfOpen);
        assert!(g.circuit_closed(), "half-open lets the trial call through");
        assert_eq!(g.charge(&charge(1)).await, ProviderAnswer::Approved);
        assert_eq!(sim.circuit_watch().state(), CircuitState::Closed);
    }

    #[tokio::test]
    async fn a_slow_provider_times_out() {
        let sim = SimulatedGateway::new(Duration::from_millis(500), None);
        let g = ResilientGateway::new(sim, fast());
        assert_eq!(g.charge(&charge(1)).await, ProviderAnswer::Unavailable);
    }
}
