//! Generated protobuf types and gRPC stubs of the Virtufin services.

pub mod api {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("virtufin.api.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Virtufin proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/virtufin_descriptor.bin"));
