// mimalloc: glibc's malloc/free were 13 % of a service's CPU under load (README "Benchmark").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let service = inventory_service::startup::run_from_env();
    event_toolkit::service::main("inventory-service", service).await
}
