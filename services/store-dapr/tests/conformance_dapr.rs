//! The conformance suite on the Dapr backend against real daprd (built from
//! packaging/daprd) with the deployment's resource files, over a real
//! valkey-server. Without a daprd binary every case says SKIP.
#![allow(clippy::expect_used)]

use virtufin_store::{Backend, DeliveryOptions};
use virtufin_store_dapr::{DaprOptions, connect};
use virtufin_testkit::{
    ValkeyServer,
    daprd::{self, Daprd, DaprdOptions},
};

async fn make(options: DeliveryOptions) -> Option<(Backend, (ValkeyServer, Daprd))> {
    let binary = daprd::require("a Dapr conformance case")?;
    let valkey = ValkeyServer::start();
    let sidecar = Daprd::start(
        &binary,
        &valkey,
        DaprdOptions {
            processing_timeout: options.processing_timeout,
            redeliver_interval: options.reclaim_interval,
            ..DaprdOptions::default()
        },
    );
    let mut o = DaprOptions::new(sidecar.grpc_port, sidecar.http_port);
    o.retry_delay = options.retry_delay;
    o.max_in_flight = options.max_in_flight;
    let backend = connect(o).await.expect("connect through daprd");
    Some((backend, (valkey, sidecar)))
}

virtufin_store::conformance_tests!(optional make);
