//! Compiles the .proto files with protox (pure Rust, so no system `protoc`)
//! and generates the tonic/prost code, plus one descriptor set per service
//! for its gRPC reflection (so each lists only its own services).

use std::{env, fs, path::PathBuf};

use prost::Message;

/// (descriptor file, protos of that service).
const SETS: &[(&str, &[&str])] = &[
    (
        "api_descriptor.bin",
        &[
            "virtufin/api/v1/health.proto",
            "virtufin/api/v1/state.proto",
            "virtufin/api/v1/pubsub.proto",
            "virtufin/api/v1/gateway.proto",
        ],
    ),
    (
        "websocketmanager_descriptor.bin",
        &["virtufin/websocketmanager/v1/websocketmanager.proto"],
    ),
    (
        "workmanager_descriptor.bin",
        &["virtufin/workmanager/v1/workmanager.proto"],
    ),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    for (file, protos) in SETS {
        let fds = protox::compile(*protos, ["."])?;
        fs::write(out.join(file), fds.encode_to_vec())?;
        tonic_prost_build::configure()
            .build_server(true)
            .build_client(true)
            // The generated `Client::connect(dst)` constructor would clash
            // with the websocketmanager's `Connect` RPC; clients are built
            // with `Client::new(channel)` instead.
            .build_transport(false)
            .compile_fds(fds)?;
        for p in *protos {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    Ok(())
}
