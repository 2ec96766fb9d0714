use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    event_toolkit::service::init_tracing();
    match payment_service::startup::run_from_env().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "payment-service failed");
            ExitCode::FAILURE
        }
    }
}
