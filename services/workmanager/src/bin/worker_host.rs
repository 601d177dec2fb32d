//! virtufin-worker-host: the process one native worker runs in (see the
//! virtufin-worker-host crate).

fn main() -> std::process::ExitCode {
    virtufin_worker_host::main()
}
