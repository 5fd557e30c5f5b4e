//! `echo-extension`: an external Lambda extension on the `lambda-extension` crate (the Rust
//! client of the Extensions API). It registers for INVOKE and SHUTDOWN and prints one line per
//! event, so the function's log shows what the platform sent it:
//! `echo-extension: INVOKE <request id>` and `echo-extension: SHUTDOWN <reason>`.

use lambda_extension::{service_fn, Error, LambdaEvent, NextEvent};

async fn on_event(event: LambdaEvent) -> Result<(), Error> {
    match event.next {
        NextEvent::Invoke(e) => println!("echo-extension: INVOKE {}", e.request_id),
        NextEvent::Shutdown(e) => println!("echo-extension: SHUTDOWN {}", e.shutdown_reason),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_extension::run(service_fn(on_event)).await
}
