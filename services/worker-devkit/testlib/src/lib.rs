//! A native worker for the workmanager's tests. The event's data (a
//! string) says what to do: `crash` dereferences an unmapped address
//! (SIGSEGV), `hang` never returns, `alloc` touches more memory than a
//! worker may have, `panic` panics, `error` fails, `none` answers nothing;
//! anything else is echoed as `{"echo": data}`.
// `crash` must really fault: that takes a raw pointer write.
#![allow(unsafe_code)]

use serde_json::{Value, json};
use virtufin_worker_devkit::{Context, Event, Worker, WorkerError, export_worker};

#[derive(Default)]
pub struct TestLib;

impl Worker for TestLib {
    fn source(&self) -> &str {
        "urn:com.virtufin.testlib"
    }

    fn response_type(&self) -> &str {
        "testlib.answers"
    }

    fn handle(
        &mut self,
        ctx: &Context,
        _input: &Event,
        data: Value,
    ) -> Result<Option<Value>, WorkerError> {
        match data.as_str().unwrap_or("") {
            "crash" => {
                ctx.warn("about to segfault");
                // SAFETY: none — this is the fault the test wants. Address
                // 16 is never mapped (mmap_min_addr), so the write faults.
                unsafe { std::ptr::write_volatile(16 as *mut u8, 1) };
                Ok(None)
            }
            "hang" => loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            },
            "alloc" => {
                // 1 GiB, touched: past the tests' per-worker limit.
                let mut v: Vec<u8> = Vec::new();
                v.try_reserve_exact(1 << 30)
                    .map_err(|e| WorkerError(format!("allocation refused: {e}")))?;
                v.resize(1 << 30, 1);
                Ok(Some(json!({"len": v.len()})))
            }
            "panic" => panic!("asked to panic"),
            "error" => Err("asked to fail".into()),
            "none" => Ok(None),
            _ => Ok(Some(json!({"echo": data}))),
        }
    }
}

export_worker!(TestLib);
