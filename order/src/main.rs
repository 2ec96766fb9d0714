#[tokio::main]
async fn main() -> std::process::ExitCode {
    let service = order_service::startup::run_from_env();
    event_toolkit::service::main("order-service", service).await
}
