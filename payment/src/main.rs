#[tokio::main]
async fn main() -> std::process::ExitCode {
    let service = payment_service::startup::run_from_env();
    event_toolkit::service::main("payment-service", service).await
}
