//! A fourth service written against the toolkit alone, next to the real saga: `shipping-service`
//! schedules a shipment for each confirmed order (`shipping.scheduled.v1`, or
//! `shipping.failed.v1` for a customer it cannot reach) and calls a scheduled one off when the
//! order is cancelled (`shipping.cancelled.v1`). It is this file and
//! `tests/migrations/shipping/0001_shipments.sql` (plus clap and axum as dev-dependencies, which a
//! crate of its own would list in its own Cargo.toml); nothing else in the project names it.
//!
//! Its payload types are its own reading of the order events (only the fields it needs), its
//! durable is declared by those types, and the toolkit brings the inbox, the outbox, dead letters,
//! readiness and the admin routes. It runs in this test process against the open nats-server the
//! other end-to-end tests use, so no NATS user is needed.
//!
//! As a deployed crate it would also be registered where the project lists its services (a line
//! each, but a block in nats.conf, compose.yaml and docs/asyncapi.yaml; no code): the workspace
//! `members` (Cargo.toml); its `wiring()` in the three lists that read it, `consumers()` in
//! tests/src/invariants.rs, tests/tests/asyncapi.rs and tests/tests/nats_permissions.rs; a user
//! with its permissions and a `shipping.>` export to PEOPLE in nats.conf; SHIPPING in `STREAMS`
//! of deploy/nats/provision.py and tests/src/catalogue.rs; its channels, operations and messages
//! in docs/asyncapi.yaml; a service and its NATS password in compose.yaml and .env.example, its
//! database in deploy/postgres/init.sh, and its binary in the Dockerfile's `-p` and `cp` lists.

use event_toolkit::db::{lock_entity, Database};
use event_toolkit::http::App;
use event_toolkit::service::{Runtime, ServiceConfig, StartError};
use event_toolkit::testing::{eventually, TestDb};
use event_toolkit::{
    emit, event_payload, Backend, Context, Envelope, EventPayload, HandlerError, On, StreamSpec,
    Subscription,
};
use saga_e2e::{System, SystemConfig, ADMIN_TOKEN, WAIT};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{AnyConnection, Row};
use tokio_util::sync::CancellationToken;

use event_toolkit::on_both_backends as on_backends;
use saga_e2e::OrderStatus;

on_backends!(
    a_confirmed_order_is_scheduled_once_even_when_its_confirmation_comes_again,
    a_cancelled_order_schedules_nothing_and_a_scheduled_one_is_called_off,
    an_order_for_nowhere_fails_to_ship,
    a_newer_version_of_the_confirmation_is_dead_lettered_by_shipping,
);

// ---- the shipping service ----

const NAME: &str = "shipping-service";
const DURABLE: &str = "shipping-from-orders";
/// Customers whose id starts with this live where nothing is delivered.
const UNREACHABLE: &str = "nowhere";

/// `orders.placed.v1`, as read here: the confirmation does not say who the customer is.
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    customer_id: String,
}
event_payload!(OrderPlaced, "orders.placed.v1", order_id);

/// `orders.confirmed.v1`, as read here.
#[derive(Serialize, Deserialize)]
struct OrderConfirmed {
    order_id: String,
}
event_payload!(OrderConfirmed, "orders.confirmed.v1", order_id);

/// `orders.cancelled.v1`, as read here.
#[derive(Serialize, Deserialize)]
struct OrderCancelled {
    order_id: String,
}
event_payload!(OrderCancelled, "orders.cancelled.v1", order_id);

#[derive(Serialize, Deserialize)]
struct ShippingScheduled {
    order_id: String,
}
event_payload!(ShippingScheduled, "shipping.scheduled.v1", order_id);

#[derive(Serialize, Deserialize)]
struct ShippingFailed {
    order_id: String,
    reason: String,
}
event_payload!(ShippingFailed, "shipping.failed.v1", order_id);

#[derive(Serialize, Deserialize)]
struct ShippingCancelled {
    order_id: String,
}
event_payload!(ShippingCancelled, "shipping.cancelled.v1", order_id);

#[derive(Clone, Copy)]
struct Ship;

/// The order's shipment row, locked for this transaction: (status, customer). A row it creates is
/// UNSEEN until the handler decides.
async fn shipment(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<(String, Option<String>), sqlx::Error> {
    let row = lock_entity(
        conn,
        "shipments",
        "order_id",
        order_id,
        &[("status", "'UNSEEN'")],
        "status, customer_id",
    )
    .await?;
    Ok((row.try_get("status")?, row.try_get("customer_id")?))
}

async fn set_status(conn: &mut AnyConnection, order_id: &str, status: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE shipments SET status = $2 WHERE order_id = $1")
        .bind(order_id)
        .bind(status)
        .execute(conn)
        .await
        .map(drop)
}

impl On<OrderPlaced> for Ship {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        _: &Context,
        e: OrderPlaced,
    ) -> Result<(), HandlerError> {
        // A cancellation that arrived first keeps its CANCELLED.
        let (status, _) = shipment(conn, &e.order_id).await?;
        let status = if status == "UNSEEN" {
            "PLACED"
        } else {
            &status
        };
        sqlx::query("UPDATE shipments SET status = $2, customer_id = $3 WHERE order_id = $1")
            .bind(&e.order_id)
            .bind(status)
            .bind(&e.customer_id)
            .execute(conn)
            .await?;
        Ok(())
    }
}

impl On<OrderConfirmed> for Ship {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        e: OrderConfirmed,
    ) -> Result<(), HandlerError> {
        let (status, customer) = shipment(conn, &e.order_id).await?;
        sqlx::query("UPDATE shipments SET confirmations = confirmations + 1 WHERE order_id = $1")
            .bind(&e.order_id)
            .execute(&mut *conn)
            .await?;
        match (status.as_str(), customer) {
            // The placement precedes the confirmation in the stream; it arrives after it only when
            // its own delivery failed and is being retried, so wait for it.
            ("UNSEEN", _) => Err(HandlerError::Transient(format!(
                "order {} confirmed before its placement was seen",
                e.order_id
            ))),
            ("PLACED", Some(customer)) if customer.starts_with(UNREACHABLE) => {
                set_status(conn, &e.order_id, "FAILED").await?;
                let reason = "no_delivery_area".to_owned();
                let order_id = e.order_id;
                emit(conn, ctx, &ShippingFailed { order_id, reason }).await?;
                Ok(())
            }
            ("PLACED", Some(_)) => {
                set_status(conn, &e.order_id, "SCHEDULED").await?;
                emit(
                    conn,
                    ctx,
                    &ShippingScheduled {
                        order_id: e.order_id,
                    },
                )
                .await?;
                Ok(())
            }
            // Decided already (a copy with a new id), or cancelled first: nothing more to do.
            _ => Ok(()),
        }
    }
}

impl On<OrderCancelled> for Ship {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        e: OrderCancelled,
    ) -> Result<(), HandlerError> {
        let (status, _) = shipment(conn, &e.order_id).await?;
        match status.as_str() {
            "SCHEDULED" => {
                set_status(conn, &e.order_id, "CANCELLED").await?;
                emit(
                    conn,
                    ctx,
                    &ShippingCancelled {
                        order_id: e.order_id,
                    },
                )
                .await?;
            }
            // Kept, so a confirmation arriving later schedules nothing.
            "UNSEEN" | "PLACED" => set_status(conn, &e.order_id, "CANCELLED").await?,
            // Nothing was shipped, or it is called off already.
            _ => {}
        }
        Ok(())
    }
}

#[derive(clap::Parser)]
struct Settings {
    #[command(flatten)]
    service: ServiceConfig,
}

/// The shipping service, running in this process.
struct Shipping {
    url: String,
    db: Database,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), StartError>>,
    _db: TestDb,
}

impl Shipping {
    /// Start it on its own database, next to `s`, and wait until it is ready.
    async fn start(s: &System, backend: Backend) -> Self {
        let test_db = TestDb::new(backend).await;
        let nats_url = s.nats.url();
        let args = [
            NAME,
            "--nats-url",
            nats_url.as_str(),
            "--database-url",
            test_db.url.as_str(),
            "--admin-token",
            ADMIN_TOKEN,
        ];
        let mut settings: Settings =
            event_toolkit::config::try_parse_from(NAME, "127.0.0.1:0", args).expect("settings");
        settings.service.named(NAME).expect("name");
        let mut runtime = Runtime::start(
            &settings.service,
            sqlx::migrate!("migrations/shipping"),
            &[StreamSpec::new("SHIPPING", &["shipping.>"])],
        )
        .await
        .expect("start shipping-service");
        runtime.subscribe(
            Subscription::new(DURABLE, "ORDERS")
                .on::<OrderPlaced>(Ship)
                .on::<OrderConfirmed>(Ship)
                .on::<OrderCancelled>(Ship),
        );
        let (db, stop) = (runtime.db.clone(), runtime.shutdown.clone());
        let app = App::new(runtime, axum::Router::new(), &settings.service.http_addr)
            .await
            .expect("bind");
        let url = format!("http://127.0.0.1:{}", app.port());
        let task = tokio::spawn(app.run_until_stopped());
        let shipping = Self {
            url,
            db,
            stop,
            task,
            _db: test_db,
        };
        let ready = format!("{}/readyz", shipping.url);
        eventually(WAIT, "shipping-service ready", || async {
            let r = s.http.get(&ready).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        shipping
    }

    /// Shut down in order, as on SIGTERM.
    async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("shipping-service task")
            .expect("shipping-service stopped cleanly");
    }

    /// (status, customer, confirmations applied) of an order's shipment row.
    async fn row(&self, order_id: &str) -> Option<(String, Option<String>, i64)> {
        sqlx::query("SELECT status, customer_id, confirmations FROM shipments WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(self.db.pool())
            .await
            .expect("read shipments")
            .map(|r| (r.get(0), r.get(1), r.get(2)))
    }

    /// Wait until the durable has applied everything in ORDERS so far and what that caused is on
    /// the SHIPPING stream.
    async fn settle(&self, s: &System) {
        let js = async_nats::jetstream::new(s.client.clone());
        eventually(WAIT, "shipping to catch up with ORDERS", || async {
            let mut consumer = js
                .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                    DURABLE, "ORDERS",
                )
                .await
                .ok()?;
            let info = consumer.info().await.ok()?;
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                return None;
            }
            let unpublished: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM outbox WHERE published_at_us IS NULL AND parked_at_us IS NULL",
            )
            .fetch_one(self.db.pool())
            .await
            .ok()?;
            (unpublished == 0).then_some(())
        })
        .await;
    }
}

// ---- helpers ----

/// Every event on the SHIPPING stream about `order_id`.
async fn shipping_events(s: &System, order_id: &str) -> Vec<Envelope> {
    s.stream_messages("SHIPPING")
        .await
        .into_iter()
        .map(|(_, _, _, body)| serde_json::from_slice::<Envelope>(&body).expect("a CloudEvent"))
        .filter(|e| e.subject.as_deref() == Some(order_id))
        .collect()
}

/// The `event_type` event of saga `order_id`, once it is on the ORDERS stream.
async fn order_event(s: &System, order_id: &str, event_type: &str) -> Envelope {
    eventually(WAIT, &format!("{event_type} of {order_id}"), || async {
        s.saga_events(order_id)
            .await
            .into_iter()
            .find(|e| e.event_type == event_type)
    })
    .await
}

/// Publish to JetStream without a `Nats-Msg-Id` (the server's duplicate window sees nothing) and
/// wait for the stream to store it.
async fn publish(s: &System, subject: &str, body: Vec<u8>) {
    async_nats::jetstream::new(s.client.clone())
        .publish(subject.to_owned(), body.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

async fn system(b: Backend) -> System {
    let s = System::start(SystemConfig::new(b)).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 10_000).await;
    s
}

/// Place an order and wait until it is CONFIRMED.
async fn confirmed_order(s: &System, customer: &str) -> String {
    let id = s.place_order(customer, &[("WIDGET", 1, 250)]).await;
    assert_eq!(
        s.wait_terminal_view(&id).await.status,
        OrderStatus::Confirmed
    );
    id
}

// ---- scenarios ----

async fn a_confirmed_order_is_scheduled_once_even_when_its_confirmation_comes_again(b: Backend) {
    let s = system(b).await;
    let shipping = Shipping::start(&s, b).await;
    let id = confirmed_order(&s, "alice").await;
    let confirmed = order_event(&s, &id, OrderConfirmed::TYPE).await;
    shipping.settle(&s).await;

    let events = shipping_events(&s, &id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let scheduled = &events[0];
    assert_eq!(scheduled.event_type, ShippingScheduled::TYPE);
    assert_eq!(scheduled.source, "/shipping-service");
    assert_eq!(scheduled.correlationid.as_deref(), Some(id.as_str()));
    assert_eq!(
        scheduled.causationid.as_deref(),
        Some(confirmed.id.as_str())
    );
    assert_eq!(
        scheduled
            .payload::<ShippingScheduled>()
            .expect("payload")
            .order_id,
        id
    );
    let (_, customer, _) = shipping.row(&id).await.expect("shipment");
    assert_eq!(customer.as_deref(), Some("alice"));

    // The same CloudEvent again, as a redelivery or a republish would bring it: the inbox knows its
    // id, so the handler never sees it.
    publish(&s, OrderConfirmed::SUBJECT, confirmed.to_bytes()).await;
    shipping.settle(&s).await;
    assert_eq!(shipping_events(&s, &id).await.len(), 1);
    assert_eq!(
        shipping.row(&id).await,
        Some(("SCHEDULED".into(), Some("alice".into()), 1))
    );

    // A copy under a new id does reach the handler, which finds the shipment decided.
    let mut copy = confirmed.clone();
    copy.id = uuid::Uuid::now_v7().to_string();
    publish(&s, OrderConfirmed::SUBJECT, copy.to_bytes()).await;
    shipping.settle(&s).await;
    assert_eq!(shipping_events(&s, &id).await.len(), 1);
    assert_eq!(
        shipping.row(&id).await,
        Some(("SCHEDULED".into(), Some("alice".into()), 2))
    );
    shipping.stop().await;
}

async fn a_cancelled_order_schedules_nothing_and_a_scheduled_one_is_called_off(b: Backend) {
    let s = system(b).await;
    let shipping = Shipping::start(&s, b).await;

    // More than the stock: the saga cancels it.
    let short = s.place_order("alice", &[("WIDGET", 50, 100)]).await;
    assert_eq!(
        s.wait_terminal_view(&short).await.status,
        OrderStatus::Cancelled
    );
    order_event(&s, &short, "orders.cancelled.v1").await;
    shipping.settle(&s).await;
    assert!(shipping_events(&s, &short).await.is_empty());
    assert_eq!(
        shipping.row(&short).await,
        Some(("CANCELLED".into(), Some("alice".into()), 0))
    );

    // A cancellation for an order shipping never saw, then its confirmation: the cancellation is
    // kept, so the late confirmation schedules nothing.
    let ghost = uuid::Uuid::now_v7().to_string();
    let cancel = json!({ "order_id": ghost, "reason": "customer_cancelled" });
    publish(&s, "orders.cancelled.v1", cancel.to_string().into_bytes()).await;
    let confirm = json!({ "order_id": ghost });
    publish(
        &s,
        OrderConfirmed::SUBJECT,
        confirm.to_string().into_bytes(),
    )
    .await;
    shipping.settle(&s).await;
    assert!(shipping_events(&s, &ghost).await.is_empty());
    assert_eq!(
        shipping.row(&ghost).await,
        Some(("CANCELLED".into(), None, 1))
    );

    // A scheduled shipment is called off by a cancellation, which it names as its cause. (The saga
    // never cancels a confirmed order; the cancellation is published by hand.)
    let id = confirmed_order(&s, "alice").await;
    // The order row turns CONFIRMED before the relay has put the event on the stream.
    order_event(&s, &id, OrderConfirmed::TYPE).await;
    shipping.settle(&s).await;
    assert_eq!(shipping_events(&s, &id).await.len(), 1);
    let mut cancellation = Envelope::new(
        "/order-service",
        &OrderCancelled {
            order_id: id.clone(),
        },
        Some(id.clone()),
    );
    cancellation.data = json!({ "order_id": id, "reason": "customer_cancelled" });
    publish(&s, OrderCancelled::SUBJECT, cancellation.to_bytes()).await;
    shipping.settle(&s).await;
    let events = shipping_events(&s, &id).await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, [ShippingScheduled::TYPE, ShippingCancelled::TYPE]);
    assert_eq!(
        events[1].causationid.as_deref(),
        Some(cancellation.id.as_str())
    );
    assert_eq!(events[1].correlationid.as_deref(), Some(id.as_str()));
    assert_eq!(
        shipping.row(&id).await.map(|r| r.0),
        Some("CANCELLED".into())
    );
    shipping.stop().await;
}

async fn an_order_for_nowhere_fails_to_ship(b: Backend) {
    let s = system(b).await;
    s.set_balance("nowhere-land", 10_000).await;
    let shipping = Shipping::start(&s, b).await;
    let id = confirmed_order(&s, "nowhere-land").await;
    let confirmed = order_event(&s, &id, OrderConfirmed::TYPE).await;
    shipping.settle(&s).await;

    let events = shipping_events(&s, &id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event_type, ShippingFailed::TYPE);
    assert_eq!(
        events[0].causationid.as_deref(),
        Some(confirmed.id.as_str())
    );
    let failed: ShippingFailed = events[0].payload().expect("payload");
    assert_eq!(
        (failed.order_id.as_str(), failed.reason.as_str()),
        (id.as_str(), "no_delivery_area")
    );
    assert_eq!(shipping.row(&id).await.map(|r| r.0), Some("FAILED".into()));
    shipping.stop().await;
}

async fn a_newer_version_of_the_confirmation_is_dead_lettered_by_shipping(b: Backend) {
    let s = system(b).await;
    let shipping = Shipping::start(&s, b).await;
    let id = uuid::Uuid::now_v7().to_string();
    let body = json!({ "order_id": id }).to_string().into_bytes();
    publish(&s, "orders.confirmed.v2", body).await;

    // The durable's filter takes every version of the types it handles, so one it cannot read is
    // set aside where an operator sees it, instead of passing unread.
    let letters = format!("{}/admin/dead-letters", shipping.url);
    let letter: Value = eventually(WAIT, "shipping's dead letter", || async {
        let page: Value = s.http.get(&letters).send().await.ok()?.json().await.ok()?;
        page["items"]
            .as_array()?
            .iter()
            .find(|d| d["subject"] == "orders.confirmed.v2")
            .cloned()
    })
    .await;
    assert_eq!(letter["consumer"], DURABLE);
    assert_eq!(letter["stream"], "ORDERS");
    let reason = letter["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("orders.confirmed.v2"), "{letter}");
    shipping.settle(&s).await;
    assert!(shipping_events(&s, &id).await.is_empty());
    assert_eq!(shipping.row(&id).await, None, "nothing of it was applied");

    // The admin routes are the toolkit's, behind the token this service was given.
    let anonymous = reqwest::Client::new()
        .get(&letters)
        .send()
        .await
        .expect("GET");
    assert_eq!(anonymous.status(), 401);
    shipping.stop().await;
}
