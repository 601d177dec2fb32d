//! The Virtufin native worker C ABI, version 1, shared by the worker host
//! (which loads a worker library) and the DevKit (which writes one).
//!
//! A worker library exports
//! `int32_t Process(const VirtufinHost*, const uint8_t* in, int32_t in_len,
//! uint8_t** out, int32_t* out_len)` — `in` is a FlatBuffers `CloudEvent`,
//! `*out` a FlatBuffers `WorkerResponse` the library allocated; 0 means
//! success — and `void FreeResult(uint8_t*)`, called once for every
//! non-null `*out`. The schema is `schema/worker_api.fbs` (namespace
//! `Virtufin.Worker.FlatBuffers`); `src/generated.rs` is flatc's output
//! for it (`regen.sh`).
//!
//! [`frame`] holds the messages between the workmanager and its worker
//! host process.

use std::ffi::{c_char, c_void};

pub mod frame;
mod json;

#[allow(clippy::all, unsafe_code, unsafe_op_in_unsafe_fn, missing_docs)]
#[rustfmt::skip]
mod generated;

pub use generated::virtufin::worker::flat_buffers as fb;

/// The ABI version this crate speaks (`VirtufinHost::abi_version`).
pub const ABI_VERSION: i32 = 1;
/// The exported symbol the engine calls per event.
pub const PROCESS_SYMBOL: &str = "Process";
/// The exported symbol that releases `Process`'s result buffer.
pub const FREE_RESULT_SYMBOL: &str = "FreeResult";

/// `log(engine_ptr, level, message)`: level 0=trace … 4=error; `message`
/// is NUL-terminated UTF-8, valid for the call.
pub type LogFn = unsafe extern "C" fn(*mut c_void, i32, *const c_char);
/// `gateway_call(engine_ptr, service, method, request, request_len,
/// &response, &response_len)`: calls the api's Gateway with a JSON request.
/// 0: `*response` holds the JSON answer. Non-zero: the call failed and
/// `*response` (when not null) holds a UTF-8 message. A non-null
/// `*response` is released with `free_response` either way.
pub type GatewayCallFn = unsafe extern "C" fn(
    *mut c_void,
    *const c_char,
    *const c_char,
    *const u8,
    i32,
    *mut *mut u8,
    *mut i32,
) -> i32;
/// `free_response(engine_ptr, response)`.
pub type FreeResponseFn = unsafe extern "C" fn(*mut c_void, *mut u8);
/// `Process` as exported by a worker library.
pub type ProcessFn =
    unsafe extern "C" fn(*const VirtufinHost, *const u8, i32, *mut *mut u8, *mut i32) -> i32;
/// `FreeResult` as exported by a worker library.
pub type FreeResultFn = unsafe extern "C" fn(*mut u8);

/// What the engine hands `Process`: its callbacks. 40 bytes on 64-bit
/// targets, laid out as the original's `virtufin_worker_api_c.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VirtufinHost {
    /// Opaque to workers: passed back as the callbacks' first argument.
    pub engine_ptr: *mut c_void,
    pub abi_version: i32,
    pub log: Option<LogFn>,
    pub gateway_call: Option<GatewayCallFn>,
    pub free_response: Option<FreeResponseFn>,
}

/// A CloudEvent, owned: what crosses the ABI, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub r#type: String,
    pub source: String,
    pub specversion: String,
    pub datacontenttype: String,
    pub dataschema: String,
    pub subject: String,
    pub time: String,
    pub data: Vec<u8>,
    /// Extension attributes in order (`correlationid` first when present).
    pub extensions: Vec<(String, String)>,
}

/// A buffer that is not the FlatBuffer it should be.
#[derive(Debug, Clone, thiserror::Error)]
#[error("not a valid {what} FlatBuffer: {source}")]
pub struct DecodeError {
    what: &'static str,
    #[source]
    source: flatbuffers::InvalidFlatbuffer,
}

impl Event {
    /// An extension attribute's value.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.extensions
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn from_table(ce: fb::CloudEvent<'_>) -> Self {
        let s = |v: Option<&str>| v.unwrap_or_default().to_owned();
        Self {
            id: s(ce.id()),
            r#type: s(ce.type_()),
            source: s(ce.source()),
            specversion: s(ce.specversion()),
            datacontenttype: s(ce.datacontenttype()),
            dataschema: s(ce.dataschema()),
            subject: s(ce.subject()),
            time: s(ce.time()),
            data: ce.data().map(|d| d.bytes().to_vec()).unwrap_or_default(),
            extensions: ce
                .extensions()
                .map(|v| {
                    v.iter()
                        .map(|e| (s(e.name()), s(e.value())))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        }
    }

    /// Decodes (and verifies) a FlatBuffers `CloudEvent`.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let ce = flatbuffers::root::<fb::CloudEvent>(buf).map_err(|source| DecodeError {
            what: "CloudEvent",
            source,
        })?;
        Ok(Self::from_table(ce))
    }

    fn build<'a, A: flatbuffers::Allocator + 'a>(
        &self,
        b: &mut flatbuffers::FlatBufferBuilder<'a, A>,
    ) -> flatbuffers::WIPOffset<fb::CloudEvent<'a>> {
        // Empty attributes stay absent, as the original's builders leave them.
        let mut s = |v: &str| (!v.is_empty()).then(|| b.create_string(v));
        let id = s(&self.id);
        let type_ = s(&self.r#type);
        let source = s(&self.source);
        let specversion = s(&self.specversion);
        let datacontenttype = s(&self.datacontenttype);
        let dataschema = s(&self.dataschema);
        let subject = s(&self.subject);
        let time = s(&self.time);
        let data = (!self.data.is_empty()).then(|| b.create_vector(&self.data));
        let exts: Vec<_> = self
            .extensions
            .iter()
            .map(|(k, v)| {
                let args = fb::ExtensionArgs {
                    name: Some(b.create_string(k)),
                    value: Some(b.create_string(v)),
                };
                fb::Extension::create(b, &args)
            })
            .collect();
        let extensions = (!exts.is_empty()).then(|| b.create_vector(&exts));
        fb::CloudEvent::create(
            b,
            &fb::CloudEventArgs {
                id,
                type_,
                source,
                specversion,
                datacontenttype,
                dataschema,
                subject,
                time,
                data,
                extensions,
            },
        )
    }

    /// Encodes as a FlatBuffers `CloudEvent` (what `Process` receives).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = flatbuffers::FlatBufferBuilder::with_capacity(256 + self.data.len());
        let root = self.build(&mut b);
        b.finish_minimal(root);
        b.finished_data().to_vec()
    }
}

/// What `Process` answers: an event to publish, an error, both or neither.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub event: Option<Event>,
    pub error: Option<String>,
}

impl Response {
    /// Encodes as a FlatBuffers `WorkerResponse`.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = flatbuffers::FlatBufferBuilder::with_capacity(256);
        let result_event = self.event.as_ref().map(|e| e.build(&mut b));
        let error_message = self.error.as_deref().map(|m| b.create_string(m));
        let root = fb::WorkerResponse::create(
            &mut b,
            &fb::WorkerResponseArgs {
                result_event,
                error_message,
            },
        );
        fb::finish_worker_response_buffer(&mut b, root);
        b.finished_data().to_vec()
    }

    /// Decodes (and verifies) a FlatBuffers `WorkerResponse`.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let r = fb::root_as_worker_response(buf).map_err(|source| DecodeError {
            what: "WorkerResponse",
            source,
        })?;
        Ok(Self {
            event: r.result_event().map(Event::from_table),
            error: r.error_message().map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn generated_code_is_current_with_the_schema() {
        use sha2::Digest;
        let schema = include_bytes!("../schema/worker_api.fbs");
        let sum: String = sha2::Sha256::digest(schema)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let first = include_str!("generated.rs").lines().next().unwrap();
        assert_eq!(
            first,
            format!("// schema sha256: {sum}"),
            "schema/worker_api.fbs changed: run services/worker-abi/regen.sh"
        );
    }

    #[test]
    fn events_and_responses_round_trip() {
        let e = Event {
            id: "1".into(),
            r#type: "t".into(),
            source: "s".into(),
            specversion: "1.0".into(),
            data: b"{\"a\":1}".to_vec(),
            extensions: vec![("correlationid".into(), "c".into())],
            ..Default::default()
        };
        assert_eq!(Event::decode(&e.encode()).unwrap(), e);
        let r = Response {
            event: Some(e),
            error: Some("x".into()),
        };
        assert_eq!(Response::decode(&r.encode()).unwrap(), r);
        assert!(Event::decode(b"\x01\x02").is_err());
    }

    #[test]
    fn the_host_struct_has_the_original_layout() {
        assert_eq!(std::mem::size_of::<VirtufinHost>(), 40);
    }
}
