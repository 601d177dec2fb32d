//! The conformance suite on the embedded backend.

use virtufin_store::{Backend, DeliveryOptions, memory};

async fn make(options: DeliveryOptions) -> (Backend, ()) {
    (memory::backend(options, 10_000), ())
}

virtufin_store::conformance_tests!(make);
