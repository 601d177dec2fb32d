//! Compiles the .proto files with protox (pure Rust, so no system `protoc`)
//! and generates the tonic/prost code plus a descriptor set for reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "virtufin/api/v1/health.proto",
    "virtufin/api/v1/state.proto",
    "virtufin/api/v1/pubsub.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["."])?;
    fs::write(out.join("virtufin_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
