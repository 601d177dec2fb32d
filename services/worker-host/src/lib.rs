//! The worker host: one process per native worker. The workmanager starts
//! `virtufin-worker-host --socket PATH --library PATH [--memory-limit N]`;
//! the host connects to the socket, lowers its own address-space limit,
//! loads the library (C ABI v1: `Process`/`FreeResult`), says `ready` and
//! then serves `process`, `ping` and `shutdown` frames (see
//! [`virtufin_worker_abi::frame`]). The worker's `log` and `gateway_call`
//! callbacks travel to the workmanager as `log` and `gateway` frames.
//!
//! Synchronous on purpose: `Process` is a blocking C call, one at a time,
//! and a blocking socket keeps the per-event cost to two small writes and
//! reads.
// FFI is this crate's job: loading a library, calling it, and being called
// back through C function pointers.
#![allow(unsafe_code)]

use std::{
    ffi::{CStr, c_char, c_void},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::ExitCode,
    sync::Mutex,
};

use serde_json::Value;
use virtufin_worker_abi::{
    ABI_VERSION, Event, FREE_RESULT_SYMBOL, FreeResultFn, PROCESS_SYMBOL, ProcessFn, Response,
    VirtufinHost,
    frame::{self, Frame},
};

struct Args {
    socket: PathBuf,
    library: PathBuf,
    memory_limit: u64,
    max_frame: usize,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        socket: PathBuf::new(),
        library: PathBuf::new(),
        memory_limit: 0,
        max_frame: 16 << 20,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(k) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| format!("{} needs a value", k.to_string_lossy()))?;
        match k.to_str() {
            Some("--socket") => a.socket = v.into(),
            Some("--library") => a.library = v.into(),
            Some("--memory-limit") => {
                a.memory_limit = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--memory-limit takes a number of bytes")?
            }
            Some("--max-frame") => {
                a.max_frame = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--max-frame takes a number of bytes")?
            }
            _ => return Err(format!("unknown argument {}", k.to_string_lossy())),
        }
    }
    if a.socket.as_os_str().is_empty() || a.library.as_os_str().is_empty() {
        return Err("usage: virtufin-worker-host --socket PATH --library PATH [--memory-limit BYTES] [--max-frame BYTES]".into());
    }
    Ok(a)
}

/// What `engine_ptr` points to: the connection, shared by the callbacks
/// (a worker may call them from threads of its own).
struct Ctx {
    conn: Mutex<UnixStream>,
    max_frame: usize,
}

impl Ctx {
    fn send(&self, f: &Frame) -> std::io::Result<()> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        frame::write(&mut *c, f)
    }

    /// Sends `f` and reads the next frame under one lock, so that a
    /// gateway call and its result cannot interleave with another's.
    fn call(&self, f: &Frame) -> std::io::Result<Frame> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        frame::write(&mut *c, f)?;
        frame::read(&mut *c, self.max_frame)
    }
}

fn set_memory_limit(bytes: u64) -> Result<(), String> {
    let lim = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we own for the duration of the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "setrlimit(RLIMIT_AS, {bytes}): {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// Copies `bytes` into a malloc'd buffer (released by `free_response`).
fn malloc_copy(bytes: &[u8], out: *mut *mut u8, out_len: *mut i32) {
    if out.is_null() || out_len.is_null() {
        return;
    }
    let Ok(len) = i32::try_from(bytes.len()) else {
        return;
    };
    // SAFETY: malloc(n.max(1)) returns a buffer of at least that size or
    // null; we copy exactly `len` bytes into it; `out`/`out_len` were
    // checked non-null and point to the caller's variables.
    unsafe {
        let p = libc::malloc(bytes.len().max(1)) as *mut u8;
        if p.is_null() {
            return;
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        *out = p;
        *out_len = len;
    }
}

/// # Safety
/// `engine_ptr` is the `Ctx` this host put in `VirtufinHost`; `message`
/// is null or a NUL-terminated string (the ABI's contract).
unsafe extern "C" fn log_cb(engine_ptr: *mut c_void, level: i32, message: *const c_char) {
    if engine_ptr.is_null() || message.is_null() {
        return;
    }
    // SAFETY: see the function's contract.
    let (ctx, msg) = unsafe { (&*(engine_ptr as *const Ctx), CStr::from_ptr(message)) };
    let _ = ctx.send(&Frame::Log {
        level: level.clamp(0, 4),
        message: msg.to_string_lossy().into_owned(),
    });
}

/// # Safety
/// As `log_cb`, and `request` points to `request_len` readable bytes.
unsafe extern "C" fn gateway_cb(
    engine_ptr: *mut c_void,
    service: *const c_char,
    method: *const c_char,
    request: *const u8,
    request_len: i32,
    response: *mut *mut u8,
    response_len: *mut i32,
) -> i32 {
    if !response.is_null() {
        // SAFETY: the caller's out-parameter, checked non-null.
        unsafe { *response = std::ptr::null_mut() };
    }
    if !response_len.is_null() {
        // SAFETY: as above.
        unsafe { *response_len = 0 };
    }
    let fail = |msg: &str, code: i32| {
        malloc_copy(msg.as_bytes(), response, response_len);
        code
    };
    if engine_ptr.is_null() || service.is_null() || method.is_null() {
        return fail("gateway_call: null argument", 2);
    }
    // SAFETY: see the function's contract; a negative length reads nothing.
    let (ctx, service, method, req) = unsafe {
        (
            &*(engine_ptr as *const Ctx),
            CStr::from_ptr(service).to_string_lossy().into_owned(),
            CStr::from_ptr(method).to_string_lossy().into_owned(),
            if request.is_null() || request_len <= 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(request, request_len as usize)
            },
        )
    };
    let Ok(request) = std::str::from_utf8(req) else {
        return fail("gateway_call: the request is not UTF-8 JSON", 2);
    };
    match ctx.call(&Frame::Gateway {
        service,
        method,
        request: request.to_owned(),
    }) {
        Ok(Frame::GatewayResult {
            response: Some(r), ..
        }) => {
            malloc_copy(r.as_bytes(), response, response_len);
            0
        }
        Ok(Frame::GatewayResult { error, .. }) => {
            fail(error.as_deref().unwrap_or("the gateway call failed"), 1)
        }
        Ok(other) => fail(&format!("gateway_call: unexpected frame {other:?}"), 3),
        Err(e) => fail(&format!("gateway_call: the workmanager is gone: {e}"), 3),
    }
}

/// # Safety
/// `buf` is null or came from `malloc_copy`.
unsafe extern "C" fn free_response_cb(_engine_ptr: *mut c_void, buf: *mut u8) {
    if !buf.is_null() {
        // SAFETY: see the function's contract.
        unsafe { libc::free(buf as *mut c_void) };
    }
}

struct Worker {
    // Kept alive for `process`/`free`, which point into it.
    _lib: libloading::Library,
    process: ProcessFn,
    free: FreeResultFn,
}

fn load(path: &std::path::Path) -> Result<Worker, String> {
    // SAFETY: loading runs the library's initialisers: that is user code,
    // and running it in this disposable process is the point of the host.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("cannot load the library: {e}"))?;
    // SAFETY: the symbols are declared with the ABI's signatures; a library
    // that exports them with others breaks the contract it claims.
    let (process, free) = unsafe {
        let p = lib
            .get::<ProcessFn>(PROCESS_SYMBOL.as_bytes())
            .map_err(|e| format!("the library exports no {PROCESS_SYMBOL}: {e}"))?;
        let f = lib
            .get::<FreeResultFn>(FREE_RESULT_SYMBOL.as_bytes())
            .map_err(|e| format!("the library exports no {FREE_RESULT_SYMBOL}: {e}"))?;
        (*p, *f)
    };
    Ok(Worker {
        _lib: lib,
        process,
        free,
    })
}

fn process(w: &Worker, host: &VirtufinHost, event: &Value) -> Frame {
    let input = Event::from_dict(event).encode();
    let Ok(in_len) = i32::try_from(input.len()) else {
        return Frame::Error {
            error_type: "InvalidInput".into(),
            message: "the event is larger than 2 GiB".into(),
        };
    };
    let mut out: *mut u8 = std::ptr::null_mut();
    let mut out_len: i32 = 0;
    // SAFETY: the ABI's call: `host` and `input` outlive the call; `out`
    // and `out_len` are ours to be written.
    let rc = unsafe { (w.process)(host, input.as_ptr(), in_len, &mut out, &mut out_len) };
    let bytes = if out.is_null() || out_len <= 0 {
        Vec::new()
    } else {
        // SAFETY: the library says `out` holds `out_len` bytes.
        unsafe { std::slice::from_raw_parts(out, out_len as usize) }.to_vec()
    };
    if !out.is_null() {
        // SAFETY: released once, by the library's own FreeResult.
        unsafe { (w.free)(out) };
    }
    let resp = if bytes.is_empty() {
        Ok(Response::default())
    } else {
        Response::decode(&bytes)
    };
    match (rc, resp) {
        (
            0,
            Ok(Response {
                event: None,
                error: Some(m),
            }),
        ) => Frame::Error {
            error_type: "WorkerError".into(),
            message: m,
        },
        (0, Ok(r)) => Frame::Result {
            event: r.event.map(|e| e.to_dict()).unwrap_or(Value::Null),
            error_message: r.error,
        },
        (0, Err(e)) => Frame::Error {
            error_type: "InvalidResponse".into(),
            message: e.to_string(),
        },
        (rc, r) => Frame::Error {
            error_type: "ProcessFailed".into(),
            message: match r.ok().and_then(|r| r.error) {
                Some(m) => format!("Process returned {rc}: {m}"),
                None => format!("Process returned {rc}"),
            },
        },
    }
}

/// The host's main loop; returns when told to stop or when the
/// workmanager goes away.
pub fn main() -> ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("virtufin-worker-host: {e}");
            return ExitCode::from(2);
        }
    };
    // Die with the workmanager even when it is killed outright.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let conn = match UnixStream::connect(&a.socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("virtufin-worker-host: {}: {e}", a.socket.display());
            return ExitCode::from(1);
        }
    };
    let Ok(reader) = conn.try_clone() else {
        return ExitCode::from(1);
    };
    let ctx = Box::new(Ctx {
        conn: Mutex::new(conn),
        max_frame: a.max_frame,
    });
    let loaded = if a.memory_limit > 0 {
        set_memory_limit(a.memory_limit).and_then(|()| load(&a.library))
    } else {
        load(&a.library)
    };
    let worker = match loaded {
        Ok(w) => w,
        Err(message) => {
            let _ = ctx.send(&Frame::Error {
                error_type: "LoadError".into(),
                message,
            });
            return ExitCode::from(1);
        }
    };
    let host = VirtufinHost {
        engine_ptr: &*ctx as *const Ctx as *mut c_void,
        abi_version: ABI_VERSION,
        log: Some(log_cb),
        gateway_call: Some(gateway_cb),
        free_response: Some(free_response_cb),
    };
    if ctx.send(&Frame::Ready).is_err() {
        return ExitCode::from(1);
    }
    let mut reader = reader;
    loop {
        // Frames come one at a time: the workmanager sends the next only
        // after this one's answer, so reading outside the lock is safe.
        let f = match frame::read(&mut reader, a.max_frame) {
            Ok(f) => f,
            Err(_) => return ExitCode::SUCCESS,
        };
        let answer = match f {
            Frame::Ping => Frame::Pong,
            Frame::Shutdown => return ExitCode::SUCCESS,
            Frame::Process { event } => process(&worker, &host, &event),
            other => Frame::Error {
                error_type: "Protocol".into(),
                message: format!("unexpected frame {other:?}"),
            },
        };
        if ctx.send(&answer).is_err() {
            return ExitCode::SUCCESS;
        }
    }
}
