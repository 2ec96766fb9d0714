//! One trace per saga: the three services export their spans over OTLP to a receiver inside the
//! test. All spans of a saga, from `POST /orders` through inventory and payment and back, share
//! one trace id and form one tree; the relay sends the trace context as NATS headers; log lines
//! inside handlers carry the trace id.

use std::collections::{BTreeMap, BTreeSet};

use event_toolkit::trace::receiver::{OtlpReceiver, ReceivedSpan};
use event_toolkit::Backend;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{Service, System, SystemConfig, WAIT};
use serde_json::json;

use event_toolkit::on_both_backends as on_backends;

on_backends!(
    a_confirmed_saga_is_one_trace,
    a_compensated_saga_is_one_trace_under_the_callers_span,
);

/// OTLP span kinds.
const SERVER: i32 = 2;
const CONSUMER: i32 = 5;

/// A consumer span: (service, durable, event type).
type Hop = (&'static str, &'static str, &'static str);

const POST: Hop = ("order-service", "", "POST /orders");

async fn start(b: Backend) -> (System, OtlpReceiver) {
    let otlp = OtlpReceiver::start().await;
    let mut config = SystemConfig::new(b);
    config.env.extend([
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            otlp.endpoint().to_owned(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned()),
    ]);
    let s = System::start(config).await;
    s.set_stock("WIDGET", 10).await;
    (s, otlp)
}

fn is(span: &ReceivedSpan, hop: Hop) -> bool {
    if hop == POST {
        return span.kind == SERVER && span.service == hop.0 && span.name == hop.2;
    }
    span.kind == CONSUMER
        && span.service == hop.0
        && span.attr("consumer") == Some(hop.1)
        && span.attr("event_type") == Some(hop.2)
}

/// Wait until a span of every hop of the saga `order_id` arrived, then (briefly) until every
/// parent did: services export on their own schedules, a child may come first.
async fn saga_spans(otlp: &OtlpReceiver, order_id: &str, hops: &[Hop]) {
    saga_e2e::wait_for(WAIT, "the spans of every hop of the saga", || async {
        let spans: Vec<ReceivedSpan> = otlp
            .spans()
            .into_iter()
            .filter(|s| s.attr("correlation_id") == Some(order_id))
            .collect();
        hops.iter()
            .all(|h| spans.iter().any(|s| is(s, *h)))
            .then_some(())
    })
    .await;
    for _ in 0..25 {
        let spans = otlp.spans();
        let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        let dangling = spans
            .iter()
            .filter(|s| s.attr("correlation_id") == Some(order_id))
            .filter(|s| {
                s.parent_span_id
                    .as_deref()
                    .is_some_and(|p| !ids.contains(p))
            })
            .count();
        if dangling <= 1 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The saga's spans are one trace, and that trace is one tree rooted at the `POST /orders` span,
/// whose parent is `caller` (the span id of the caller's `traceparent`, if it sent one). Each hop's
/// span is the child of the span of the hop that emitted its event. Returns the trace id.
fn assert_one_tree(
    all: &[ReceivedSpan],
    order_id: &str,
    caller: Option<&str>,
    edges: &[(Hop, Hop)],
) -> String {
    let saga: Vec<&ReceivedSpan> = all
        .iter()
        .filter(|s| s.attr("correlation_id") == Some(order_id))
        .collect();
    let traces: BTreeSet<&str> = saga.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces.len(), 1, "one trace id for the saga: {saga:#?}");
    let trace = traces.into_iter().next().unwrap_or_default().to_owned();

    let in_trace: Vec<&ReceivedSpan> = all.iter().filter(|s| s.trace_id == trace).collect();
    for s in &in_trace {
        assert_eq!(
            s.attr("correlation_id"),
            Some(order_id),
            "nothing but the saga in its trace: {s:#?}"
        );
    }
    let ids: BTreeMap<&str, &ReceivedSpan> =
        in_trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    assert_eq!(ids.len(), in_trace.len(), "span ids are unique");
    let roots: Vec<&&ReceivedSpan> = in_trace
        .iter()
        .filter(|s| {
            s.parent_span_id
                .as_deref()
                .is_none_or(|p| !ids.contains_key(p))
        })
        .collect();
    assert_eq!(roots.len(), 1, "exactly one root: {roots:#?}");
    assert!(is(roots[0], POST), "the root is POST /orders: {roots:#?}");
    assert_eq!(roots[0].parent_span_id.as_deref(), caller);

    // Parent links follow the events: each consumer span is a child of whoever emitted its event.
    for (child, parent) in edges {
        for s in in_trace.iter().filter(|s| is(s, *child)) {
            let p = s.parent_span_id.as_deref().and_then(|p| ids.get(p));
            assert!(
                p.is_some_and(|p| is(p, *parent)),
                "{child:?} is a child of {parent:?}, not of {p:#?}"
            );
        }
    }
    trace
}

/// Strip ANSI colour codes from a log.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every line of `service` that mentions the order inside a handler carries the trace id, the
/// correlation id and the event id.
fn assert_handler_lines_carry_the_trace(s: &System, service: Service, order_id: &str, trace: &str) {
    let log = plain(&s.log(service));
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(order_id) && l.contains("event{"))
        .collect();
    assert!(!lines.is_empty(), "{service:?} logged in its handlers");
    for line in lines {
        assert!(line.contains(&format!("trace_id={trace}")), "{line}");
        assert!(
            line.contains(&format!("correlation_id=\"{order_id}\"")),
            "{line}"
        );
        assert!(line.contains("event_id="), "{line}");
    }
}

async fn a_confirmed_saga_is_one_trace(b: Backend) {
    let (s, otlp) = start(b).await;
    s.set_balance("alice", 10_000).await;
    let id = s.place_order("alice", &[("WIDGET", 2, 100)]).await;
    assert_eq!(s.wait_terminal(&id).await["status"], "CONFIRMED");

    let placed = (
        "inventory-service",
        "inventory-from-orders",
        "orders.placed.v1",
    );
    let reserved_o = (
        "order-service",
        "order-from-inventory",
        "inventory.reserved.v1",
    );
    let reserved_p = (
        "payment-service",
        "payment-from-inventory",
        "inventory.reserved.v1",
    );
    let succeeded = (
        "order-service",
        "order-from-payments",
        "payments.succeeded.v1",
    );
    let confirmed = (
        "inventory-service",
        "inventory-from-orders",
        "orders.confirmed.v1",
    );
    let hops = [POST, placed, reserved_o, reserved_p, succeeded, confirmed];
    saga_spans(&otlp, &id, &hops).await;
    let trace = assert_one_tree(
        &otlp.spans(),
        &id,
        None,
        &[
            (placed, POST),
            (reserved_o, placed),
            (reserved_p, placed),
            // Settled later by the payment processor, from the context the handler kept.
            (succeeded, reserved_p),
            (confirmed, succeeded),
        ],
    );
    // The CloudEvents extension and the NATS header agree, on every event of the saga.
    for (stream, n) in [("ORDERS", 2), ("INVENTORY", 2), ("PAYMENTS", 1)] {
        let headers = trace_headers(&s, stream, &id).await;
        assert_eq!(headers.len(), n, "{stream}: {headers:?}");
        for (header, body, state) in headers {
            assert_eq!(header.as_deref(), body.as_deref(), "{stream}");
            let header = header.expect("a traceparent header");
            assert_eq!(&header[3..35], trace, "{stream}: {header}");
            assert_eq!(state, None, "no tracestate was given");
        }
    }
    for svc in Service::ALL {
        assert_handler_lines_carry_the_trace(&s, svc, &id, &trace);
    }
    wait_quiet(&s, WAIT).await;
    check(&s).await.assert_clean();
}

async fn a_compensated_saga_is_one_trace_under_the_callers_span(b: Backend) {
    let (s, otlp) = start(b).await;
    s.set_balance("bob", 100).await;
    let caller_trace = format!("{:032x}", rand::random::<u128>() | 1);
    let caller_span = format!("{:016x}", rand::random::<u64>() | 1);
    let r = s
        .http
        .post(format!("{}/orders", s.url(Service::Order)))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .header("tracestate", "saga=e2e")
        .json(&json!({
            "customer_id": "bob",
            "currency": "EUR",
            "items": [{ "sku": "WIDGET", "quantity": 1, "unit_price_minor": 500 }],
        }))
        .send()
        .await
        .expect("place order");
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.expect("order")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    s.record_accepted(&id);
    assert_eq!(s.wait_terminal(&id).await["reason"], "insufficient_funds");

    let placed = (
        "inventory-service",
        "inventory-from-orders",
        "orders.placed.v1",
    );
    let reserved_o = (
        "order-service",
        "order-from-inventory",
        "inventory.reserved.v1",
    );
    let reserved_p = (
        "payment-service",
        "payment-from-inventory",
        "inventory.reserved.v1",
    );
    let failed_o = ("order-service", "order-from-payments", "payments.failed.v1");
    let failed_i = (
        "inventory-service",
        "inventory-from-payments",
        "payments.failed.v1",
    );
    let cancelled_i = (
        "inventory-service",
        "inventory-from-orders",
        "orders.cancelled.v1",
    );
    let cancelled_p = (
        "payment-service",
        "payment-from-orders",
        "orders.cancelled.v1",
    );
    let hops = [
        POST,
        placed,
        reserved_o,
        reserved_p,
        failed_o,
        failed_i,
        cancelled_i,
        cancelled_p,
    ];
    saga_spans(&otlp, &id, &hops).await;
    let trace = assert_one_tree(
        &otlp.spans(),
        &id,
        Some(&caller_span),
        &[
            (placed, POST),
            (reserved_o, placed),
            (reserved_p, placed),
            (failed_o, reserved_p),
            (failed_i, reserved_p),
            (cancelled_i, failed_o),
            (cancelled_p, failed_o),
        ],
    );
    assert_eq!(trace, caller_trace, "the caller's trace continues");

    // The caller's tracestate travels with what its span wrote (the placement), and with what
    // follows until the payment processor, which keeps the traceparent only.
    let orders = trace_headers(&s, "ORDERS", &id).await;
    assert_eq!(orders.len(), 2, "placed, cancelled: {orders:?}");
    for (header, body, _) in &orders {
        assert_eq!(header, body);
    }
    assert_eq!(orders[0].2.as_deref(), Some("saga=e2e"), "{orders:?}");
    let inventory = trace_headers(&s, "INVENTORY", &id).await;
    assert_eq!(inventory[0].2.as_deref(), Some("saga=e2e"), "{inventory:?}");
    assert_handler_lines_carry_the_trace(&s, Service::Inventory, &id, &trace);
    wait_quiet(&s, WAIT).await;
    check(&s).await.assert_clean();
}

/// Per structured event of `stream` with this correlation id: its `traceparent` header, its
/// CloudEvents `traceparent`, its `tracestate` header.
async fn trace_headers(
    s: &System,
    stream: &str,
    correlation: &str,
) -> Vec<(Option<String>, Option<String>, Option<String>)> {
    let js = async_nats::jetstream::new(s.client.clone());
    let handle = js.get_stream(stream).await.expect("stream");
    let last = handle.get_info().await.expect("info").state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(m) = handle.get_raw_message(seq).await else {
            continue;
        };
        let Ok(e) = serde_json::from_slice::<event_toolkit::Envelope>(&m.payload) else {
            continue;
        };
        if e.correlationid.as_deref() != Some(correlation) {
            continue;
        }
        let header = |name: &str| m.headers.get(name).map(|v| v.to_string());
        out.push((header("traceparent"), e.traceparent, header("tracestate")));
    }
    out
}
