//! The conformance suite on the Dapr backend, through real gRPC, against a
//! Dapr double (the `dapr` crate's generated server, backed by the Valkey
//! backend on a real valkey-server). Real daprd was not run here.
#![allow(clippy::expect_used)]

use virtufin_store::{Backend, DeliveryOptions};
use virtufin_store_dapr::{DaprOptions, connect};
use virtufin_testkit::ValkeyServer;

async fn make(
    options: DeliveryOptions,
) -> (Backend, (ValkeyServer, virtufin_dapr_double::Running)) {
    let valkey = ValkeyServer::start();
    let any = "127.0.0.1:0".parse().expect("addr");
    let double = virtufin_dapr_double::start(&valkey.url(), "virtufin-api", options, any, any)
        .await
        .expect("start the Dapr double");
    let backend = connect(DaprOptions::new(double.grpc.port(), double.http.port()))
        .await
        .expect("connect through the double");
    (backend, (valkey, double))
}

virtufin_store::conformance_tests!(make);
