use std::hint::black_box;
use std::time::Instant;
use event_toolkit::trace::{adopt, TraceContext};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const N: u32 = 200_000;

fn before() {
    let span = tracing::info_span!("event", consumer = %"inventory-from-orders", event_id = %"01a21d60-e202-7330-bb69-c1e03eb5b77f", event_type = %"orders.placed.v1", correlation_id = "01a21d60-e1fd-7656-8827-6a9665f58d8a", delivered = 1i64);
    let _g = span.enter();
    black_box(&span);
}

fn after() {
    let span = tracing::info_span!("event", otel.name = %format_args!("process {}", "orders.placed.v1"), otel.kind = "consumer", consumer = %"inventory-from-orders", event_id = %"01a21d60-e202-7330-bb69-c1e03eb5b77f", event_type = %"orders.placed.v1", correlation_id = "01a21d60-e1fd-7656-8827-6a9665f58d8a", delivered = 1i64, trace_id = tracing::field::Empty);
    if let Some(id) = adopt(&span, Some(TP), None) {
        span.record("trace_id", tracing::field::display(id));
    }
    let _g = span.enter();
    // what Envelope::new and enqueue do per emitted event
    black_box(TraceContext::current());
}

fn time(name: &str, f: fn()) {
    for _ in 0..10_000 { f(); }
    let t = Instant::now();
    for _ in 0..N { f(); }
    println!("{name:40} {:7.0} ns/hop", t.elapsed().as_nanos() as f64 / N as f64);
}

fn fmt_layer<S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>>() -> impl Layer<S> {
    tracing_subscriber::fmt::layer().with_writer(std::io::sink).with_filter(tracing_subscriber::EnvFilter::new("info"))
}

#[tokio::main]
async fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    match which.as_str() {
        "before" => {
            let sub = tracing_subscriber::registry().with(fmt_layer());
            tracing::subscriber::set_global_default(sub).unwrap();
            time("before: fmt only, old span", before);
        }
        "off" => {
            unsafe { std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT"); }
            let (otel, e) = event_toolkit::trace::layer("bench");
            println!("{e:?}");
            let sub = tracing_subscriber::registry().with(fmt_layer()).with(otel);
            tracing::subscriber::set_global_default(sub).unwrap();
            time("after: fmt + otel, no export", after);
        }
        "export" => {
            let rx = event_toolkit::trace::receiver::OtlpReceiver::start().await;
            unsafe { std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint()); }
            let (otel, e) = event_toolkit::trace::layer("bench");
            println!("{e:?}");
            let sub = tracing_subscriber::registry().with(fmt_layer()).with(otel);
            tracing::subscriber::set_global_default(sub).unwrap();
            time("after: fmt + otel, OTLP export (local)", after);
            tokio::time::sleep(std::time::Duration::from_secs(6)).await;
            println!("received {} spans", rx.spans().len());
        }
        _ => {}
    }
}
