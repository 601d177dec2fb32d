//! Write native Virtufin workers in Rust. The counterpart of the
//! original DevKit's `WorkerBase`/`CommandWorker` for the C ABI v1:
//!
//! ```ignore
//! use virtufin_worker_devkit::{Context, Event, Worker, WorkerError, export_worker};
//! use serde_json::{Value, json};
//!
//! #[derive(Default)]
//! struct Echo;
//!
//! impl Worker for Echo {
//!     fn source(&self) -> &str { "urn:example:echo" }
//!     fn response_type(&self) -> &str { "example.echo.reply" }
//!     fn handle(&mut self, ctx: &Context, _input: &Event, data: Value)
//!         -> Result<Option<Value>, WorkerError> {
//!         ctx.info("echoing");
//!         Ok(Some(json!({ "echo": data })))
//!     }
//! }
//!
//! export_worker!(Echo);
//! ```
//!
//! Build the crate as a `cdylib` and create the worker with MIME type
//! `application/x-native-dll` and the `.so` as its code. The answer is a
//! CloudEvent with the worker's `source` and `response_type`, the input's
//! `correlationid`, a fresh id and the current time, and the handler's
//! value as JSON data; a handler error (or panic) answers the error
//! envelope `{"command":"error","success":false,"message":...}` instead.
// The crate's purpose is the C boundary: exported functions, raw buffers.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    panic::AssertUnwindSafe,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde_json::{Value, json};
pub use virtufin_worker_abi::{ABI_VERSION, Event, Response, VirtufinHost};

/// The extension that ties an answer to its request.
pub const CORRELATION_ID: &str = "correlationid";
/// The extension that names where the answer goes (the workmanager reads it).
pub const REPLY_TOPIC: &str = "replytopic";

/// `log` levels of the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// A failure in a handler; becomes the error envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerError(pub String);

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WorkerError {}

impl From<String> for WorkerError {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for WorkerError {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// A failed `gateway_call`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    /// The ABI's return code (non-zero).
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gateway call failed ({}): {}", self.code, self.message)
    }
}

impl std::error::Error for GatewayError {}

impl From<GatewayError> for WorkerError {
    fn from(e: GatewayError) -> Self {
        Self(e.to_string())
    }
}

/// The engine's callbacks for the current call: logging and the api's
/// Gateway.
pub struct Context<'a> {
    host: &'a VirtufinHost,
}

impl Context<'_> {
    /// The ABI version the engine speaks.
    pub fn abi_version(&self) -> i32 {
        self.host.abi_version
    }

    /// Logs through the workmanager (its journal, with the worker's id).
    pub fn log(&self, level: Level, message: &str) {
        let Some(log) = self.host.log else { return };
        // Interior NULs would cut the message short; drop them.
        let Ok(msg) = CString::new(message.replace('\0', "")) else {
            return;
        };
        // SAFETY: `log` comes from the engine with its `engine_ptr`; the
        // message is NUL-terminated and outlives the call.
        unsafe { log(self.host.engine_ptr, level as i32, msg.as_ptr()) }
    }

    pub fn info(&self, message: &str) {
        self.log(Level::Info, message)
    }

    pub fn warn(&self, message: &str) {
        self.log(Level::Warn, message)
    }

    /// Calls `method` of `service` through the api's Gateway with a JSON
    /// request; the JSON answer.
    pub fn gateway_call(
        &self,
        service: &str,
        method: &str,
        request_json: &str,
    ) -> Result<String, GatewayError> {
        let err = |code, message: &str| GatewayError {
            code,
            message: message.to_owned(),
        };
        let Some(call) = self.host.gateway_call else {
            return Err(err(-1, "the engine offers no gateway_call"));
        };
        let (Ok(s), Ok(m)) = (CString::new(service), CString::new(method)) else {
            return Err(err(-1, "service and method must not contain NUL"));
        };
        let Ok(len) = i32::try_from(request_json.len()) else {
            return Err(err(-1, "the request is larger than 2 GiB"));
        };
        let mut out: *mut u8 = std::ptr::null_mut();
        let mut out_len: i32 = 0;
        // SAFETY: the ABI's call; every pointer outlives it and the out
        // parameters are ours.
        let rc = unsafe {
            call(
                self.host.engine_ptr,
                s.as_ptr(),
                m.as_ptr(),
                request_json.as_ptr(),
                len,
                &mut out,
                &mut out_len,
            )
        };
        let body = if out.is_null() || out_len <= 0 {
            String::new()
        } else {
            // SAFETY: the engine says `out` holds `out_len` bytes.
            String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(out, out_len as usize) })
                .into_owned()
        };
        if !out.is_null()
            && let Some(free) = self.host.free_response
        {
            // SAFETY: released once, by the engine that allocated it.
            unsafe { free(self.host.engine_ptr, out) };
        }
        if rc == 0 {
            Ok(body)
        } else {
            Err(GatewayError {
                code: rc,
                message: body,
            })
        }
    }
}

/// A worker (the original's `WorkerBase<JsonNode, JsonObject>`): JSON in,
/// JSON out, the envelope built for you.
pub trait Worker: Send + 'static {
    /// `source` of the answers.
    fn source(&self) -> &str;
    /// `type` of the answers: the topic they are published to, unless the
    /// input names a `replytopic`.
    fn response_type(&self) -> &str;
    /// Handles one event. `data` is the event's data as JSON (a JSON
    /// string when it is not JSON). `Ok(None)`: no answer.
    fn handle(
        &mut self,
        ctx: &Context,
        input: &Event,
        data: Value,
    ) -> Result<Option<Value>, WorkerError>;
}

/// A worker for a fixed set of named commands (the original's
/// `CommandWorker<T>`): the command is the data's `command` field, matched
/// case-insensitively against [`CommandWorker::Command`]'s names.
pub trait CommandWorker: Send + 'static {
    type Command: Command;
    fn source(&self) -> &str;
    fn response_type(&self) -> &str;
    fn handle_command(
        &mut self,
        ctx: &Context,
        input: &Event,
        command: Self::Command,
        data: Value,
    ) -> Result<Option<Value>, WorkerError>;

    /// Where the command is read from; override for another field.
    fn extract_command(&self, _input: &Event, data: &Value) -> Result<Self::Command, WorkerError> {
        let name = data
            .get("command")
            .and_then(Value::as_str)
            .ok_or("the data has no \"command\" field")?;
        Self::Command::from_name(&name.to_ascii_lowercase()).ok_or_else(|| {
            WorkerError(format!(
                "unknown command '{name}'; known: {}",
                Self::Command::NAMES.join(", ")
            ))
        })
    }
}

/// Commands by name (lower case).
pub trait Command: Sized {
    const NAMES: &'static [&'static str];
    /// `name` is lower case.
    fn from_name(name: &str) -> Option<Self>;
}

impl<T: CommandWorker> Worker for T {
    fn source(&self) -> &str {
        CommandWorker::source(self)
    }

    fn response_type(&self) -> &str {
        CommandWorker::response_type(self)
    }

    fn handle(
        &mut self,
        ctx: &Context,
        input: &Event,
        data: Value,
    ) -> Result<Option<Value>, WorkerError> {
        let c = self.extract_command(input, &data)?;
        self.handle_command(ctx, input, c, data)
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh event id: process id, time and a counter.
fn new_id() -> String {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}-{t:x}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The answer envelope for `payload` (`BuildResponse` + `WithCorrelationId`
/// + `WithTimestamp`).
pub fn build_response(source: &str, response_type: &str, input: &Event, payload: &Value) -> Event {
    let mut extensions = Vec::new();
    if let Some(c) = input.extension(CORRELATION_ID) {
        extensions.push((CORRELATION_ID.to_owned(), c.to_owned()));
    }
    Event {
        id: new_id(),
        r#type: response_type.to_owned(),
        source: source.to_owned(),
        specversion: "1.0".into(),
        datacontenttype: "application/json".into(),
        time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        data: payload.to_string().into_bytes(),
        extensions,
        ..Default::default()
    }
}

/// The error envelope (`JsonCloudEventCodec.EncodeError`).
pub fn error_payload(message: &str) -> Value {
    json!({"command": "error", "success": false, "message": message})
}

fn data_json(e: &Event) -> Value {
    if e.data.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(&e.data)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&e.data).into_owned()))
}

/// Runs one `Process` call for `W`. Used by [`export_worker!`].
///
/// # Safety
/// The C ABI's contract: `host` is null or valid, `in_buf` holds `in_len`
/// bytes, `out_buf`/`out_len` are writable.
#[doc(hidden)]
pub unsafe fn __process<W: Worker>(
    slot: &Mutex<Option<W>>,
    init: impl FnOnce() -> W,
    host: *const VirtufinHost,
    in_buf: *const u8,
    in_len: i32,
    out_buf: *mut *mut u8,
    out_len: *mut i32,
) -> i32 {
    if host.is_null() || out_buf.is_null() || out_len.is_null() {
        return 2;
    }
    // SAFETY: checked non-null; the engine's pointers (see the contract).
    let (host, input) = unsafe {
        *out_buf = std::ptr::null_mut();
        *out_len = 0;
        (
            &*host,
            if in_buf.is_null() || in_len <= 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(in_buf, in_len as usize)
            },
        )
    };
    let response = match Event::decode(input) {
        Err(e) => Response {
            event: None,
            error: Some(e.to_string()),
        },
        Ok(event) => {
            let ctx = Context { host };
            let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            let worker = guard.get_or_insert_with(init);
            let data = data_json(&event);
            // A panic must not unwind into the engine's C frame.
            let outcome =
                std::panic::catch_unwind(AssertUnwindSafe(|| worker.handle(&ctx, &event, data)));
            let (source, ty) = (
                worker.source().to_owned(),
                worker.response_type().to_owned(),
            );
            match outcome {
                Ok(Ok(None)) => Response::default(),
                Ok(Ok(Some(v))) => Response {
                    event: Some(build_response(&source, &ty, &event, &v)),
                    error: None,
                },
                Ok(Err(e)) => Response {
                    event: Some(build_response(&source, &ty, &event, &error_payload(&e.0))),
                    error: None,
                },
                Err(p) => {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "the handler panicked".into());
                    Response {
                        event: Some(build_response(&source, &ty, &event, &error_payload(&msg))),
                        error: Some(format!("the handler panicked: {msg}")),
                    }
                }
            }
        }
    };
    let bytes = response.encode();
    let Ok(len) = i32::try_from(bytes.len()) else {
        return 3;
    };
    // SAFETY: malloc'd buffer of `len` bytes filled from `bytes`, handed to
    // the engine, which releases it with `FreeResult` (free).
    unsafe {
        let p = libc::malloc(bytes.len().max(1)) as *mut u8;
        if p.is_null() {
            return 1;
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        *out_buf = p;
        *out_len = len;
    }
    0
}

/// Releases a buffer from [`__process`]. Used by [`export_worker!`].
///
/// # Safety
/// `buf` is null or came from `__process`.
#[doc(hidden)]
pub unsafe fn __free_result(buf: *mut u8) {
    if !buf.is_null() {
        // SAFETY: see the contract: it was malloc'd by `__process`.
        unsafe { libc::free(buf as *mut libc::c_void) }
    }
}

/// Exports `Process` and `FreeResult` for a [`Worker`] type (built with
/// `Default`, or with the given expression, on the first event).
#[macro_export]
macro_rules! export_worker {
    ($ty:ty) => {
        $crate::export_worker!($ty, <$ty as ::core::default::Default>::default());
    };
    ($ty:ty, $init:expr) => {
        static __VIRTUFIN_WORKER: ::std::sync::Mutex<::core::option::Option<$ty>> =
            ::std::sync::Mutex::new(::core::option::Option::None);

        /// The C ABI v1 entry point.
        ///
        /// # Safety
        /// Called by the Virtufin engine under the ABI's contract.
        #[allow(unsafe_code, non_snake_case)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn Process(
            host: *const $crate::VirtufinHost,
            in_buf: *const u8,
            in_len: i32,
            out_buf: *mut *mut u8,
            out_len: *mut i32,
        ) -> i32 {
            // SAFETY: forwarded under the same contract.
            unsafe {
                $crate::__process::<$ty>(
                    &__VIRTUFIN_WORKER,
                    || $init,
                    host,
                    in_buf,
                    in_len,
                    out_buf,
                    out_len,
                )
            }
        }

        /// Releases what `Process` returned.
        ///
        /// # Safety
        /// `buf` came from `Process`.
        #[allow(unsafe_code, non_snake_case)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn FreeResult(buf: *mut u8) {
            // SAFETY: forwarded under the same contract.
            unsafe { $crate::__free_result(buf) }
        }
    };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    enum Cmd {
        Ping,
    }

    impl Command for Cmd {
        const NAMES: &'static [&'static str] = &["ping"];
        fn from_name(name: &str) -> Option<Self> {
            (name == "ping").then_some(Cmd::Ping)
        }
    }

    #[derive(Default)]
    struct Pinger;

    impl CommandWorker for Pinger {
        type Command = Cmd;
        fn source(&self) -> &str {
            "urn:test"
        }
        fn response_type(&self) -> &str {
            "test.reply"
        }
        fn handle_command(
            &mut self,
            ctx: &Context,
            _input: &Event,
            _c: Cmd,
            data: Value,
        ) -> Result<Option<Value>, WorkerError> {
            if data["boom"] == true {
                panic!("boom");
            }
            // No gateway in this host: the call fails cleanly.
            let g = ctx.gateway_call("s", "m", "{}").unwrap_err();
            Ok(Some(json!({"pong": true, "gateway": g.code})))
        }
    }

    /// Runs `Process` the way an engine does and decodes the answer.
    fn call(slot: &Mutex<Option<Pinger>>, data: &str) -> Response {
        let host = VirtufinHost {
            engine_ptr: std::ptr::null_mut(),
            abi_version: ABI_VERSION,
            log: None,
            gateway_call: None,
            free_response: None,
        };
        let input = Event {
            id: "1".into(),
            datacontenttype: "application/json".into(),
            data: data.as_bytes().to_vec(),
            extensions: vec![(CORRELATION_ID.into(), "c-9".into())],
            ..Default::default()
        }
        .encode();
        let (mut out, mut len) = (std::ptr::null_mut(), 0);
        // SAFETY: valid pointers for the duration of the call.
        let rc = unsafe {
            __process(
                slot,
                Pinger::default,
                &host,
                input.as_ptr(),
                input.len() as i32,
                &mut out,
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: `out` holds `len` bytes from __process.
        let bytes = unsafe { std::slice::from_raw_parts(out, len as usize) }.to_vec();
        // SAFETY: `out` came from __process and is freed once.
        unsafe { __free_result(out) };
        Response::decode(&bytes).unwrap()
    }

    #[test]
    fn commands_answers_errors_and_panics() {
        let slot = Mutex::new(None);
        let r = call(&slot, r#"{"command":"PING"}"#);
        let e = r.event.unwrap();
        assert_eq!(
            (e.r#type.as_str(), e.source.as_str()),
            ("test.reply", "urn:test")
        );
        assert_eq!(e.extension(CORRELATION_ID), Some("c-9"));
        assert!(!e.time.is_empty() && !e.id.is_empty());
        let v: Value = serde_json::from_slice(&e.data).unwrap();
        assert_eq!(v, json!({"pong": true, "gateway": -1}));

        let r = call(&slot, r#"{"command":"jump"}"#);
        let v: Value = serde_json::from_slice(&r.event.unwrap().data).unwrap();
        assert_eq!(v["success"], false);
        assert_eq!(v["message"], "unknown command 'jump'; known: ping");
        assert!(r.error.is_none());

        let r = call(&slot, r#"{"command":"ping","boom":true}"#);
        assert_eq!(r.error.as_deref(), Some("the handler panicked: boom"));
        // The worker survives its panic.
        assert!(call(&slot, r#"{"command":"ping"}"#).event.is_some());
    }
}
