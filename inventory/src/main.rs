#[tokio::main]
async fn main() -> std::process::ExitCode {
    let service = inventory_service::startup::run_from_env();
    event_toolkit::service::main("inventory-service", service).await
}
