//! The payment provider: a trait, a simulated provider (latency, declines, outages, lost answers,
//! and a ledger of what it authorized, captured and voided), and the resilience wrapped around any
//! provider — timeout per attempt, retry with exponential backoff and jitter, a circuit breaker, a
//! bulkhead capping concurrent calls, and reconciliation by key when no answer came.
//!
//! A charge is an authorization: the provider approves it, then it is captured (the payment was
//! taken here) or voided (it was not). Every call is idempotent by the charge's key.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use failsafe::futures::CircuitBreaker;
use failsafe::{backoff, failure_policy, Config, StateMachine};
use tokio::sync::Semaphore;

use crate::domain::{FollowUp, ProviderAnswer};

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

/// What the provider knows of a charge, asked by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeStatus {
    /// Authorized (captured or not).
    Approved,
    /// Refused, or voided.
    Declined,
    /// No charge with this key.
    Unknown,
}

/// A payment provider.
pub trait PaymentGateway: Send + Sync + 'static {
    /// Authorize, idempotently by `charge.key`: a repeated charge gets the first one's answer.
    fn charge(&self, charge: &Charge) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// What became of the charge with this key (after a call whose answer never came).
    fn status(&self, key: &str) -> impl Future<Output = Result<ChargeStatus, GatewayError>> + Send;

    /// Capture the authorization with this key; capturing twice is capturing once.
    fn capture(&self, key: &str) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// Release the authorization with this key, if any; a charge with this key arriving later is
    /// refused. Voiding twice is voiding once; a captured charge is not voided (`Declined`).
    fn void(&self, key: &str) -> impl Future<Output = Result<(), GatewayError>> + Send;

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

/// Where a charge stands at the simulated provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Approved,
    Declined,
    Captured,
    Voided,
    /// Voided before any charge arrived: a late charge with this key is refused.
    Barred,
}

/// Keys in a final state (declined, captured, voided, barred) the simulated provider still
/// remembers; older ones are forgotten so that a long run does not grow without bound. Keys still
/// approved are never forgotten. A key comes back only from a retry within seconds, or a takeover
/// of a payment still pending, which has no final key.
const REMEMBERED_FINAL_KEYS: usize = 100_000;

#[derive(Debug, Default)]
struct Book {
    charges: HashMap<String, Held>,
    /// Keys whose answers are lost: every charge call with them outlives any timeout.
    lost: HashSet<String>,
    /// Final keys, oldest first.
    finals: VecDeque<String>,
    totals: ProviderLedger,
}

impl Book {
    /// Record `key` in a final state, forgetting the oldest final keys beyond the bound.
    fn settle(&mut self, key: &str, held: Held) {
        self.charges.insert(key.to_owned(), held);
        self.finals.push_back(key.to_owned());
        while self.finals.len() > REMEMBERED_FINAL_KEYS {
            if let Some(old) = self.finals.pop_front() {
                self.charges.remove(&old);
                self.lost.remove(&old);
            }
        }
    }
}

/// What the simulated provider did, for tests and operators: every approval should end captured
/// or voided (`approvals == captures + voids` once `outstanding` is 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ProviderLedger {
    /// Charges authorized (one per key).
    pub approvals: u64,
    /// Charges refused (one per key).
    pub declines: u64,
    /// Authorizations captured.
    pub captures: u64,
    /// Authorizations voided.
    pub voids: u64,
    /// Authorizations neither captured nor voided yet.
    pub outstanding: u64,
    /// Charges repeated with a key already answered, given the first answer again.
    pub repeated_charges: u64,
    /// Status questions by key.
    pub status_queries: u64,
    /// Approvals whose answer was lost (`PAYMENT_GATEWAY_TIMEOUT_EVERY`).
    pub lost_answers: u64,
    /// Captures or voids refused: of a key never approved, or a void of a capture.
    pub refused_follow_ups: u64,
}

/// A stand-in for a third-party provider. Clones share everything, so the admin endpoint's clone
/// sees and switches what the processor's clone does.
#[derive(Debug, Clone)]
pub struct SimulatedGateway {
    mode: Arc<AtomicU8>,
    latency: Duration,
    decline_over_minor: Option<i64>,
    timeout_every: u64,
    book: Arc<Mutex<Book>>,
    circuit: CircuitWatch,
}

impl SimulatedGateway {
    /// A provider answering after `latency` and declining amounts above `decline_over_minor`;
    /// see [`SimulatedGateway::losing_every`] for lost answers.
    pub fn new(latency: Duration, decline_over_minor: Option<i64>) -> Self {
        Self {
            mode: Arc::new(AtomicU8::new(0)),
            latency,
            decline_over_minor,
            timeout_every: 0,
            book: Arc::default(),
            circuit: CircuitWatch::default(),
        }
    }

    /// Lose the answer to every `n`-th approval (0: none): the charge is approved, but no call
    /// with its key answers before any timeout; asking its status does.
    pub fn losing_every(mut self, n: u64) -> Self {
        self.timeout_every = n;
        self
    }

    /// What the provider did so far.
    pub fn ledger(&self) -> ProviderLedger {
        self.with_book(|b| b.totals.clone())
    }

    fn with_book<T>(&self, f: impl FnOnce(&mut Book) -> T) -> T {
        f(&mut self.book.lock().unwrap_or_else(|e| e.into_inner()))
    }

    async fn reach(&self) -> Result<(), GatewayError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        match self.mode() {
            GatewayMode::Outage => Err(GatewayError::Unavailable("simulated outage".into())),
            _ => Ok(()),
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
        self.reach().await?;
        let decline = match self.mode() {
            GatewayMode::Decline => true,
            _ => self
                .decline_over_minor
                .is_some_and(|limit| charge.amount_minor > limit),
        };
        let (answer, lost) = self.with_book(|b| {
            let held = match b.charges.get(&charge.key) {
                Some(held) => {
                    b.totals.repeated_charges += 1;
                    *held
                }
                None if decline => {
                    b.totals.declines += 1;
                    b.settle(&charge.key, Held::Declined);
                    Held::Declined
                }
                None => {
                    b.totals.approvals += 1;
                    b.totals.outstanding += 1;
                    b.charges.insert(charge.key.clone(), Held::Approved);
                    if self.timeout_every > 0 && b.totals.approvals % self.timeout_every == 0 {
                        b.totals.lost_answers += 1;
                        b.lost.insert(charge.key.clone());
                    }
                    Held::Approved
                }
            };
            let answer = match held {
                Held::Approved | Held::Captured => Ok(()),
                Held::Declined | Held::Voided | Held::Barred => Err(GatewayError::Declined),
            };
            (answer, b.lost.contains(&charge.key))
        });
        if lost {
            std::future::pending::<()>().await;
        }
        answer
    }

    async fn status(&self, key: &str) -> Result<ChargeStatus, GatewayError> {
        self.reach().await?;
        Ok(self.with_book(|b| {
            b.totals.status_queries += 1;
            match b.charges.get(key) {
                Some(Held::Approved | Held::Captured) => ChargeStatus::Approved,
                Some(Held::Declined | Held::Voided | Held::Barred) => ChargeStatus::Declined,
                None => ChargeStatus::Unknown,
            }
        }))
    }

    async fn capture(&self, key: &str) -> Result<(), GatewayError> {
        self.reach().await?;
        self.with_book(|b| match b.charges.get(key).copied() {
            Some(Held::Approved) => {
                b.settle(key, Held::Captured);
                b.totals.captures += 1;
                b.totals.outstanding -= 1;
                Ok(())
            }
            Some(Held::Captured) => Ok(()),
            _ => {
                b.totals.refused_follow_ups += 1;
                Err(GatewayError::Declined)
            }
        })
    }

    async fn void(&self, key: &str) -> Result<(), GatewayError> {
        self.reach().await?;
        self.with_book(|b| match b.charges.get(key).copied() {
            Some(Held::Approved) => {
                b.settle(key, Held::Voided);
                b.totals.voids += 1;
                b.totals.outstanding -= 1;
                Ok(())
            }
            Some(Held::Voided | Held::Barred | Held::Declined) => Ok(()),
            None => {
                b.settle(key, Held::Barred);
                Ok(())
            }
            Some(Held::Captured) => {
                b.totals.refused_follow_ups += 1;
                Err(GatewayError::Declined)
            }
        })
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

    /// Charge with all protections; maps the outcome to what the saga needs. When no attempt
    /// answered but one may have reached the provider, the provider is asked by key what it did
    /// before the charge is given up: a lost answer is no proof of a failed charge.
    pub async fn charge(&self, charge: &Charge) -> ProviderAnswer {
        let Ok(permit) = self.bulkhead.acquire().await else {
            return ProviderAnswer::Unavailable;
        };
        self.bulkhead_gauge();
        // Whether any attempt got past the breaker (a rejected one never left this process).
        let reached = AtomicBool::new(false);
        let attempt = || async {
            // Declines are answers, not failures: they must not trip the breaker.
            let call = async {
                reached.store(true, Ordering::Relaxed);
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
        let answer = match result {
            Ok(()) => ProviderAnswer::Approved,
            Err(GatewayError::Declined) => ProviderAnswer::Declined,
            Err(GatewayError::Unavailable(reason)) if !reached.load(Ordering::Relaxed) => {
                tracing::warn!(key = %charge.key, %reason, "provider not called: circuit open");
                ProviderAnswer::Unavailable
            }
            // In the same bulkhead slot, and not behind the breaker: the question is how this
            // charge ended, and its answer must not wait for a circuit that the lost answers
            // themselves may have opened.
            Err(GatewayError::Unavailable(reason)) => {
                match tokio::time::timeout(self.config.timeout, self.inner.status(&charge.key))
                    .await
                {
                    Ok(Ok(status)) => {
                        tracing::warn!(key = %charge.key, %reason, ?status,
                            "no answer after retries; reconciled by key");
                        match status {
                            ChargeStatus::Approved => ProviderAnswer::Approved,
                            ChargeStatus::Declined => ProviderAnswer::Declined,
                            ChargeStatus::Unknown => ProviderAnswer::Unavailable,
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(key = %charge.key, %reason, error = %e,
                            "no answer after retries, nor to the status question");
                        ProviderAnswer::Uncertain
                    }
                    Err(_) => {
                        tracing::warn!(key = %charge.key, %reason,
                            "no answer after retries; the status question timed out");
                        ProviderAnswer::Uncertain
                    }
                }
            }
        };
        drop(permit);
        self.bulkhead_gauge();
        answer
    }

    /// Capture or void at the provider: one attempt within the timeout and a bulkhead slot. Not
    /// behind the breaker: these settle what was already decided, and are retried by whoever
    /// owes them until the provider answers; their failures must not decide whether new charges
    /// may go out.
    pub async fn follow_up(&self, key: &str, what: FollowUp) -> Result<(), GatewayError> {
        let Ok(permit) = self.bulkhead.acquire().await else {
            return Err(GatewayError::Unavailable("shutting down".into()));
        };
        self.bulkhead_gauge();
        let call = async {
            match what {
                FollowUp::Capture => self.inner.capture(key).await,
                FollowUp::Void => self.inner.void(key).await,
            }
        };
        let result = match tokio::time::timeout(self.config.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::Unavailable("timed out".into())),
        };
        drop(permit);
        self.bulkhead_gauge();
        result
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
        assert_eq!(g.charge(&keyed("a", 1000)).await, ProviderAnswer::Approved);
        assert_eq!(g.charge(&keyed("b", 1001)).await, ProviderAnswer::Declined);
        sim.set_mode(GatewayMode::Decline);
        assert_eq!(g.charge(&keyed("c", 1)).await, ProviderAnswer::Declined);
        assert!(g.circuit_closed(), "declines do not open the circuit");
    }

    #[tokio::test]
    async fn an_outage_exhausts_retries_then_opens_the_circuit() {
        let sim = SimulatedGateway::new(Duration::ZERO, None);
        let g = ResilientGateway::new(sim.clone(), fast());
        sim.set_mode(GatewayMode::Outage);
        // First charge: 1 attempt + 2 retries = 3 consecutive failures: the breaker opens. The
        // provider cannot be asked what it did either.
        assert_eq!(g.charge(&charge(1)).await, ProviderAnswer::Uncertain);
        assert!(!g.circuit_closed());
        assert_eq!(sim.circuit_watch().state(), CircuitState::Open);
        // While open, calls fail fast even if the provider is back: nothing reached it.
        sim.set_mode(GatewayMode::Ok);
        assert_eq!(g.charge(&charge(1)).await, ProviderAnswer::Unavailable);
        assert_eq!(sim.ledger().status_queries, 0);
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
        assert_eq!(g.charge(&charge(1)).await, ProviderAnswer::Uncertain);
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
        // Too slow for the status question as well: it may have approved.
        assert_eq!(g.charge(&charge(1)).await, ProviderAnswer::Uncertain);
    }

    fn keyed(key: &str, amount: i64) -> Charge {
        Charge {
            key: key.into(),
            ..charge(amount)
        }
    }

    #[tokio::test]
    async fn a_charge_repeated_with_its_key_gets_the_first_answer() {
        let sim = SimulatedGateway::new(Duration::ZERO, Some(1000));
        let g = ResilientGateway::new(sim.clone(), fast());
        assert_eq!(g.charge(&keyed("a", 10)).await, ProviderAnswer::Approved);
        assert_eq!(g.charge(&keyed("a", 10)).await, ProviderAnswer::Approved);
        assert_eq!(g.charge(&keyed("b", 2000)).await, ProviderAnswer::Declined);
        // Remembered by key, whatever the provider would say to a new charge now.
        sim.set_mode(GatewayMode::Decline);
        assert_eq!(g.charge(&keyed("a", 10)).await, ProviderAnswer::Approved);
        let l = sim.ledger();
        assert_eq!(
            (l.approvals, l.declines, l.repeated_charges, l.outstanding),
            (1, 1, 2, 1)
        );
    }

    #[tokio::test]
    async fn a_lost_answer_is_reconciled_by_key() {
        let sim = SimulatedGateway::new(Duration::ZERO, None).losing_every(2);
        let g = ResilientGateway::new(sim.clone(), fast());
        assert_eq!(g.charge(&keyed("a", 10)).await, ProviderAnswer::Approved);
        // Approved, but no attempt ever answers: the status question tells.
        assert_eq!(g.charge(&keyed("b", 10)).await, ProviderAnswer::Approved);
        let l = sim.ledger();
        assert_eq!(
            (
                l.approvals,
                l.lost_answers,
                l.status_queries,
                l.repeated_charges
            ),
            (2, 1, 1, 2),
            "{l:?}"
        );
        // Three timeouts in a row opened the circuit, as any failures would.
        assert!(!g.circuit_closed());
    }

    #[tokio::test]
    async fn capture_and_void_settle_each_approval_once() {
        let sim = SimulatedGateway::new(Duration::ZERO, None);
        let g = ResilientGateway::new(sim.clone(), fast());
        for key in ["a", "b"] {
            assert_eq!(g.charge(&keyed(key, 10)).await, ProviderAnswer::Approved);
        }
        for _ in 0..2 {
            assert_eq!(g.follow_up("a", FollowUp::Capture).await, Ok(()));
            assert_eq!(g.follow_up("b", FollowUp::Void).await, Ok(()));
        }
        assert_eq!(
            g.follow_up("a", FollowUp::Void).await,
            Err(GatewayError::Declined),
            "a capture is not voided"
        );
        // A void before the charge arrives bars it.
        assert_eq!(g.follow_up("c", FollowUp::Void).await, Ok(()));
        assert_eq!(g.charge(&keyed("c", 10)).await, ProviderAnswer::Declined);
        let l = sim.ledger();
        assert_eq!(
            (l.approvals, l.captures, l.voids, l.outstanding),
            (2, 1, 1, 0),
            "{l:?}"
        );
    }

    #[test]
    fn final_keys_are_forgotten_beyond_the_bound_and_approved_ones_never() {
        let mut b = Book::default();
        b.charges.insert("open".into(), Held::Approved);
        for i in 0..REMEMBERED_FINAL_KEYS + 10 {
            b.settle(&format!("k{i}"), Held::Captured);
        }
        assert_eq!(b.finals.len(), REMEMBERED_FINAL_KEYS);
        assert_eq!(b.charges.len(), REMEMBERED_FINAL_KEYS + 1);
        assert!(!b.charges.contains_key("k9") && b.charges.contains_key("k10"));
        assert_eq!(b.charges.get("open"), Some(&Held::Approved));
    }

    #[tokio::test]
    async fn follow_ups_go_out_while_the_circuit_is_open_and_leave_it_alone() {
        let sim = SimulatedGateway::new(Duration::ZERO, None);
        let g = ResilientGateway::new(sim.clone(), fast());
        assert_eq!(g.charge(&keyed("a", 10)).await, ProviderAnswer::Approved);
        sim.set_mode(GatewayMode::Outage);
        assert_eq!(g.charge(&keyed("b", 10)).await, ProviderAnswer::Uncertain);
        assert!(matches!(
            g.follow_up("a", FollowUp::Capture).await,
            Err(GatewayError::Unavailable(_))
        ));
        sim.set_mode(GatewayMode::Ok);
        assert_eq!(g.follow_up("a", FollowUp::Capture).await, Ok(()));
        assert_eq!(g.follow_up("b", FollowUp::Void).await, Ok(()));
        assert_eq!(sim.circuit_watch().state(), CircuitState::Open);
        assert_eq!(sim.ledger().captures, 1);
    }
}
