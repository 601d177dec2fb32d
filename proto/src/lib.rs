//! Generated protobuf types and gRPC stubs of the Virtufin services.

pub mod json;

pub mod api {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("virtufin.api.v1");
    }
}

pub mod websocketmanager {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("virtufin.websocketmanager.v1");
    }
}

pub mod workmanager {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("virtufin.workmanager.v1");
    }
}

/// Encoded `FileDescriptorSet` of the api's protos, for gRPC reflection.
pub const API_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/api_descriptor.bin"));

/// Encoded `FileDescriptorSet` of the websocketmanager's protos.
pub const WEBSOCKETMANAGER_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/websocketmanager_descriptor.bin"));

/// Encoded `FileDescriptorSet` of the workmanager's protos.
pub const WORKMANAGER_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/workmanager_descriptor.bin"));
