//! A backend's methods, learnt by gRPC server reflection (v1, else
//! v1alpha), and the JSON description of their messages.

use std::{
    collections::{BTreeSet, HashSet},
    time::Duration,
};

use prost::Message;
use prost_reflect::{
    Cardinality, DescriptorPool, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor,
    ServiceDescriptor,
};
use prost_types::FileDescriptorProto;
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tonic::{client::Grpc, transport::Channel};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, ServerReflectionResponse, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse,
};

/// The v1 and v1alpha reflection services are wire-identical, so one set of
/// message types serves both paths.
const REFLECTION_PATHS: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Why a backend's methods could not be learnt.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoverError {
    /// The backend answered, but serves no reflection.
    #[error("the backend does not serve gRPC reflection (v1 or v1alpha): {0}")]
    NoReflection(String),
    /// The backend could not be reached or broke off.
    #[error("{}", .0.message())]
    Unreachable(tonic::Status),
    #[error("the backend's reflection answered something unusable: {0}")]
    Bad(String),
}

/// The callable services of one backend.
#[derive(Debug, Clone)]
pub struct Catalog {
    services: Vec<ServiceDescriptor>,
}

/// How a method name given by a caller matched.
#[derive(Debug)]
pub enum Lookup {
    Found(MethodDescriptor),
    NotFound,
    Ambiguous(Vec<String>),
}

impl Catalog {
    pub fn services(&self) -> &[ServiceDescriptor] {
        &self.services
    }

    pub fn service_names(&self) -> Vec<String> {
        self.services
            .iter()
            .map(|s| s.full_name().to_owned())
            .collect()
    }

    pub fn methods(&self) -> impl Iterator<Item = MethodDescriptor> + '_ {
        self.services.iter().flat_map(|s| s.methods())
    }

    /// Finds `name`: "Method", "Service/Method", "pkg.Service/Method",
    /// "/pkg.Service/Method" or "pkg.Service.Method".
    pub fn find(&self, name: &str) -> Lookup {
        let name = name.trim().trim_start_matches('/');
        let (service, method) = match name.rsplit_once('/') {
            Some((s, m)) => (Some(s), m),
            None => match name.rsplit_once('.') {
                Some((s, m)) => (Some(s), m),
                None => (None, name),
            },
        };
        let hits: Vec<MethodDescriptor> = self
            .methods()
            .filter(|m| m.name() == method)
            .filter(|m| match service {
                None => true,
                Some(s) => m.parent_service().full_name() == s || m.parent_service().name() == s,
            })
            .collect();
        match hits.len() {
            0 => Lookup::NotFound,
            1 => hits
                .into_iter()
                .next()
                .map_or(Lookup::NotFound, Lookup::Found),
            _ => Lookup::Ambiguous(hits.iter().map(full_method_name).collect()),
        }
    }

    /// Learns the services of the backend behind `channel`.
    pub async fn discover(channel: Channel, timeout: Duration) -> Result<Self, DiscoverError> {
        let mut last = None;
        for path in REFLECTION_PATHS {
            match tokio::time::timeout(timeout, discover_on(channel.clone(), path)).await {
                Err(_) => {
                    return Err(DiscoverError::Unreachable(
                        tonic::Status::deadline_exceeded(format!(
                            "no reflection answer within {timeout:?}"
                        )),
                    ));
                }
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(DiscoverError::NoReflection(why))) => last = Some(why),
                Ok(Err(e)) => return Err(e),
            }
        }
        Err(DiscoverError::NoReflection(last.unwrap_or_default()))
    }
}

/// "package.Service/Method".
pub fn full_method_name(m: &MethodDescriptor) -> String {
    format!("{}/{}", m.parent_service().full_name(), m.name())
}

async fn discover_on(channel: Channel, path: &'static str) -> Result<Catalog, DiscoverError> {
    let mut grpc = Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| DiscoverError::Unreachable(tonic::Status::unavailable(e.to_string())))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<ServerReflectionRequest>(4);
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    let codec =
        tonic_prost::ProstCodec::<ServerReflectionRequest, ServerReflectionResponse>::default();
    let send = |req: MessageRequest| {
        let tx = tx.clone();
        async move {
            tx.send(ServerReflectionRequest {
                host: String::new(),
                message_request: Some(req),
            })
            .await
            .map_err(|_| DiscoverError::Bad("the reflection stream closed".into()))
        }
    };
    send(MessageRequest::ListServices(String::new())).await?;
    let mut responses = grpc
        .streaming(
            tonic::Request::new(requests),
            http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unimplemented => DiscoverError::NoReflection(s.message().to_owned()),
            _ => DiscoverError::Unreachable(s),
        })?
        .into_inner();
    let mut next = async || -> Result<MessageResponse, DiscoverError> {
        match responses.next().await {
            None => Err(DiscoverError::Bad(
                "the reflection stream ended early".into(),
            )),
            Some(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                Err(DiscoverError::NoReflection(s.message().to_owned()))
            }
            Some(Err(s)) => Err(DiscoverError::Unreachable(s)),
            Some(Ok(r)) => match r.message_response {
                Some(MessageResponse::ErrorResponse(e)) => Err(DiscoverError::Bad(format!(
                    "error {}: {}",
                    e.error_code, e.error_message
                ))),
                Some(m) => Ok(m),
                None => Err(DiscoverError::Bad("an empty reflection answer".into())),
            },
        }
    };
    let names: Vec<String> = match next().await? {
        MessageResponse::ListServicesResponse(l) => l
            .service
            .into_iter()
            .map(|s| s.name)
            .filter(|n| !n.starts_with("grpc.reflection."))
            .collect(),
        _ => {
            return Err(DiscoverError::Bad(
                "ListServices answered another kind".into(),
            ));
        }
    };
    let mut files: Vec<FileDescriptorProto> = Vec::new();
    let mut have: HashSet<String> = HashSet::new();
    let mut add = |bytes: Vec<Vec<u8>>, files: &mut Vec<FileDescriptorProto>| {
        for b in bytes {
            match FileDescriptorProto::decode(b.as_slice()) {
                Ok(f) => {
                    if have.insert(f.name().to_owned()) {
                        files.push(f);
                    }
                }
                Err(e) => return Err(DiscoverError::Bad(format!("a file descriptor: {e}"))),
            }
        }
        Ok(())
    };
    for name in &names {
        send(MessageRequest::FileContainingSymbol(name.clone())).await?;
        match next().await? {
            MessageResponse::FileDescriptorResponse(f) => add(f.file_descriptor_proto, &mut files)?,
            _ => return Err(DiscoverError::Bad(format!("no descriptor for {name}"))),
        }
    }
    // Servers may leave out dependencies they sent before; ask for each
    // missing one by name, and take the well-known types from our own pool
    // when the backend does not have them.
    let global = DescriptorPool::global();
    loop {
        let present: HashSet<String> = files.iter().map(|f| f.name().to_owned()).collect();
        let missing: BTreeSet<String> = files
            .iter()
            .flat_map(|f| f.dependency.iter().cloned())
            .filter(|d| !present.contains(d))
            .collect();
        let Some(dep) = missing.into_iter().next() else {
            break;
        };
        send(MessageRequest::FileByFilename(dep.clone())).await?;
        match next().await {
            Ok(MessageResponse::FileDescriptorResponse(f)) => {
                add(f.file_descriptor_proto, &mut files)?
            }
            _ => match global.get_file_by_name(&dep) {
                Some(f) => add(vec![f.file_descriptor_proto().encode_to_vec()], &mut files)?,
                None => return Err(DiscoverError::Bad(format!("missing file {dep}"))),
            },
        }
        if !files.iter().any(|f| f.name() == dep) {
            return Err(DiscoverError::Bad(format!("missing file {dep}")));
        }
    }
    drop(tx);
    let mut pool = DescriptorPool::new();
    pool.add_file_descriptor_protos(files)
        .map_err(|e| DiscoverError::Bad(e.to_string()))?;
    let services = names
        .iter()
        .filter_map(|n| pool.get_service_by_name(n))
        .collect();
    Ok(Catalog { services })
}

/// Protobuf-JSON description of a message: its fields, recursively (a
/// message met again on the same path is named, not expanded).
pub fn message_schema(m: &MessageDescriptor) -> Value {
    let mut path = Vec::new();
    describe(m, &mut path)
}

fn describe(m: &MessageDescriptor, path: &mut Vec<String>) -> Value {
    if path.iter().any(|p| p == m.full_name()) || path.len() > 16 {
        return json!({ "type": m.full_name(), "recursive": true });
    }
    path.push(m.full_name().to_owned());
    let fields: Vec<Value> = m.fields().map(|f| field(&f, path)).collect();
    let oneofs: Vec<Value> = m
        .oneofs()
        .filter(|o| !o.is_synthetic())
        .map(|o| json!({ "name": o.name(), "fields": o.fields().map(|f| f.name().to_owned()).collect::<Vec<_>>() }))
        .collect();
    path.pop();
    json!({ "type": m.full_name(), "fields": fields, "oneofs": oneofs })
}

fn field(f: &FieldDescriptor, path: &mut Vec<String>) -> Value {
    let label = if f.is_map() {
        "map"
    } else {
        match f.cardinality() {
            Cardinality::Repeated => "repeated",
            Cardinality::Required => "required",
            Cardinality::Optional => "optional",
        }
    };
    let mut v = json!({
        "name": f.name(),
        "json_name": f.json_name(),
        "number": f.number(),
        "label": label,
    });
    let kind = f.kind();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("type".into(), Value::String(kind_name(&kind)));
        match &kind {
            Kind::Message(m) if f.is_map() => {
                if let Some(value) = m.map_entry_value_field().kind().as_message() {
                    obj.insert("value".into(), describe(value, path));
                }
            }
            Kind::Message(m) => {
                obj.insert("message".into(), describe(m, path));
            }
            Kind::Enum(e) => {
                obj.insert(
                    "values".into(),
                    e.values()
                        .map(|v| v.name().to_owned())
                        .collect::<Vec<_>>()
                        .into(),
                );
            }
            _ => {}
        }
    }
    v
}

fn kind_name(k: &Kind) -> String {
    match k {
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes".into(),
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
    }
}
