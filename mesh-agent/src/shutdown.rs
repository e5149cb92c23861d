//! The shutdown signal every long-running task watches.

use tokio::sync::watch;

/// Resolves once shutdown has been requested (the value turned true) or the sender is gone.
pub async fn requested(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, so callers' futures stay `Send`.
    let _ = rx.wait_for(|stop| *stop).await.map(|_| ());
}
