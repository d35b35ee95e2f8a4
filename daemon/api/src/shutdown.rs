//! Stopping a gRPC server without waiting for ever on its clients.
//!
//! tonic's graceful shutdown waits until every connection closes. A client
//! that keeps an idle connection open (a CSI sidecar, a `kubectl`-driven
//! tool, an HTTP/2 pool) would hold the server — and whatever its owner
//! does after it, like stopping devices — until killed. [`serve_draining`]
//! gives the connections `drain` to finish after the signal, then drops
//! them.

use std::future::Future;
use std::time::Duration;

/// How long the daemons let clients finish after a shutdown signal.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Runs `serve` (a server future built around the stop future it is
/// given) until `shutdown` completes and then at most `drain` longer.
/// Returns the server's own result, or `Ok` when the drain ran out (the
/// remaining connections are closed by dropping the server).
pub async fn serve_draining<S, F, E>(
    serve: S,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> Result<(), E>
where
    S: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
    F: Future<Output = Result<(), E>>,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = serve(Box::pin(async {
        let _ = stopped.await;
    }));
    tokio::pin!(server);
    tokio::pin!(shutdown);
    tokio::select! {
        r = &mut server => return r,
        () = &mut shutdown => {}
    }
    let _ = stop.send(());
    match tokio::time::timeout(drain, server).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_never_drains_is_dropped_after_the_drain() {
        // A server that ignores its stop future (a client never leaves).
        let r: Result<(), ()> = serve_draining(
            |_stop| std::future::pending::<Result<(), ()>>(),
            async {},
            Duration::from_millis(50),
        )
        .await;
        assert_eq!(r, Ok(()));
        // One that stops when told returns its result at once.
        let r: Result<(), &str> = serve_draining(
            |stop| async move {
                stop.await;
                Err("closed")
            },
            async {},
            Duration::from_secs(3600),
        )
        .await;
        assert_eq!(r, Err("closed"));
    }
}
