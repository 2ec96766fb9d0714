use std::process::ExitCode;
use std::sync::Arc;

use api_gateway::config::Config;
use api_gateway::Gateway;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: api-gateway                         serve (settings from the environment)
       api-gateway token <customer> [--ttl 1h]   print a customer token signed with GATEWAY_JWT_SECRET
                                                 (--ttl=-1m gives an expired one)";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => serve().await,
        Some("token") => token(&args[1..]),
        Some(_) => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Seconds of a `--ttl` value: a humantime duration, `-` in front for one in the past.
fn parse_ttl(text: &str) -> Option<i64> {
    let (sign, rest) = match text.strip_prefix('-') {
        Some(r) => (-1, r),
        None => (1, text),
    };
    let d = humantime::parse_duration(rest).ok()?;
    Some(sign * d.as_secs() as i64)
}

fn token(args: &[String]) -> ExitCode {
    let mut customer = None;
    let mut ttl = 3600;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = if let Some(v) = a.strip_prefix("--ttl=") {
            Some(v.to_owned())
        } else if a == "--ttl" {
            it.next().cloned()
        } else {
            customer = Some(a.clone());
            continue;
        };
        match value.as_deref().and_then(parse_ttl) {
            Some(t) => ttl = t,
            None => {
                eprintln!("--ttl wants a duration such as 15m or 1h\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(customer) = customer.filter(|c| api_gateway::auth::valid_customer(c)) else {
        eprintln!("a customer id (1-64 of A-Z a-z 0-9 _ . : @ -) is required\n{USAGE}");
        return ExitCode::from(2);
    };
    let Some(secret) = std::env::var("GATEWAY_JWT_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
    else {
        eprintln!("GATEWAY_JWT_SECRET is not set");
        return ExitCode::FAILURE;
    };
    match api_gateway::auth::mint(secret.as_bytes(), &customer, ttl) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot sign a token: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> ExitCode {
    event_toolkit::service::init_tracing();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "api-gateway failed");
            return ExitCode::FAILURE;
        }
    };
    event_toolkit::observe::install();
    api_gateway::describe_metrics();
    let gw = Arc::new(Gateway::new(&config));
    let shutdown = CancellationToken::new();
    gw.spawn_background(shutdown.clone());
    let app = api_gateway::router(gw, &config);
    let listener = match event_toolkit::http::bind(&config.addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "api-gateway failed");
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            event_toolkit::service::termination_signal().await;
            tracing::info!("termination signal: shutting down");
            shutdown.cancel();
        }
    });
    tracing::info!(addr = %config.addr, routes = config.routes.len(), "listening");
    match event_toolkit::edge::serve(listener, app, &config.edge, shutdown).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "api-gateway failed");
            ExitCode::FAILURE
        }
    }
}
