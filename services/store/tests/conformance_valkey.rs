//! The conformance suite on Valkey: a real valkey-server/redis-server per
#![allow(clippy::expect_used)]
//! test, on a port the test bound.

use virtufin_store::{Backend, DeliveryOptions, valkey};
use virtufin_testkit::ValkeyServer;

async fn make(options: DeliveryOptions) -> (Backend, ValkeyServer) {
    let server = ValkeyServer::start();
    let backend = valkey::connect(valkey::ValkeyOptions::new(server.url()), options)
        .await
        .expect("connect to the test server");
    (backend, server)
}

virtufin_store::conformance_tests!(make);
