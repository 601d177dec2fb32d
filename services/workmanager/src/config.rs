//! The workmanager's settings.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::Parser;
pub use virtufin_common::config::ListenUrls;
use virtufin_common::config::{parse_duration, parse_urls};

use crate::{
    engine::{native::NativeOptions, python::PythonOptions},
    source::SourceRules,
};

/// The default blocked modules: process, network and native-code access.
/// (The real boundary is the process and the systemd sandbox; this keeps
/// well-meant worker code on its lane.)
pub const DEFAULT_BLOCKED: &str = "subprocess,socket,_socket,ctypes,_ctypes,multiprocessing,urllib.request,http.client,ftplib,smtplib,telnetlib,pty,requests";

/// virtufin-workmanager: runs user workers on event topics.
#[derive(Debug, Clone, Parser)]
#[command(name = "virtufin-workmanager", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub link: virtufin_api_client::link::LinkArgs,

    #[arg(long = "urls", env = "ASPNETCORE_URLS", default_value = "http://127.0.0.1:5101", value_parser = parse_urls)]
    pub http_urls: ListenUrls,
    #[arg(long, env = "VIRTUFIN_HTTP_PORT")]
    pub http_port: Option<u16>,
    #[arg(long, env = "VIRTUFIN_GRPC_PORT", default_value_t = 5102)]
    pub grpc_port: u16,
    #[arg(long, env = "VIRTUFIN_GRPC_HOST", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub grpc_host: IpAddr,
    /// This instance's id. Default: HOSTNAME, else the host name.
    #[arg(long, env = "VIRTUFIN_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Where worker code and sockets live (systemd: $STATE_DIRECTORY).
    #[arg(long, env = "STATE_DIRECTORY", default_value = ".virtufin/workmanager")]
    pub state_dir: PathBuf,
    /// The Python interpreter for text/x-python workers.
    #[arg(long, env = "VIRTUFIN_WM_PYTHON", default_value = "python3")]
    pub python: PathBuf,
    /// The host process of native (application/x-native-dll) workers.
    /// Default: virtufin-worker-host beside this executable.
    #[arg(long, env = "VIRTUFIN_WORKER_HOST")]
    pub worker_host: Option<PathBuf>,
    /// Hosts that code URLs may name, comma-separated; empty: any host with
    /// a public address. A host on the list may also resolve to private,
    /// loopback or link-local addresses (nothing else may).
    #[arg(long, env = "VIRTUFIN_CODE_URL_ALLOW", default_value = "")]
    pub code_url_allow: String,
    /// Longest time fetching code from a URL may take.
    #[arg(long, env = "VIRTUFIN_CODE_FETCH_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub code_fetch_timeout: Duration,
    /// The Nix store that nix: code sources must lie in.
    #[arg(long, env = "VIRTUFIN_NIX_STORE", default_value = "/nix/store")]
    pub nix_store: PathBuf,
    /// Modules Python workers may not import, comma-separated.
    #[arg(long, env = "VIRTUFIN_WM_PYTHON_BLOCKED_MODULES", default_value = DEFAULT_BLOCKED)]
    pub blocked_modules: String,
    /// Longest time one event may take in a worker.
    #[arg(long, env = "VIRTUFIN_WM_EVENT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub event_timeout: Duration,
    /// Memory (address space) limit of each worker process, in MiB (0: none).
    #[arg(long, env = "VIRTUFIN_WM_MEMORY_LIMIT_MB", default_value_t = 512)]
    pub memory_limit_mb: u64,
    /// Idle workers are pinged this often; one that does not answer is restarted.
    #[arg(long, env = "VIRTUFIN_WM_PING_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    #[arg(long, env = "VIRTUFIN_WM_PING_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub ping_timeout: Duration,
    /// How long a worker process may take to load its code.
    #[arg(long, env = "VIRTUFIN_WM_READY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// Failures of one event before it is dropped (with a worker.error).
    #[arg(long, env = "VIRTUFIN_WM_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Largest worker code, in bytes. Code is kept base64 in the api's
    /// state, so 3/4 of the api's VIRTUFIN_MAX_VALUE_BYTES (1 MiB) is the
    /// most that can be stored.
    #[arg(long, env = "VIRTUFIN_WM_MAX_CODE_BYTES", default_value_t = 760 * 1024)]
    pub max_code_bytes: usize,
    /// Lifetime of the recovery lease.
    #[arg(long, env = "VIRTUFIN_WM_RECOVERY_LEASE", default_value = "300s", value_parser = parse_duration)]
    pub recovery_lease: Duration,
    #[arg(long, env = "VIRTUFIN_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

impl Config {
    pub fn defaults() -> Self {
        Self::parse_from(["virtufin-workmanager"])
    }

    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.http_urls.with_port(self.http_port)
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        SocketAddr::new(self.grpc_host, self.grpc_port)
    }

    /// The instance id in effect.
    pub fn instance(&self) -> String {
        virtufin_common::config::instance_id(self.instance_id.as_deref(), "wm")
    }

    /// The interpreter as an absolute path (workers run with an empty
    /// environment, so PATH is looked up here).
    pub fn python_path(&self) -> PathBuf {
        if self.python.components().count() > 1 {
            return self.python.clone();
        }
        std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(&self.python))
                    .find(|p| p.is_file())
            })
            .unwrap_or_else(|| self.python.clone())
    }

    /// The per-process address-space limit in bytes (0: none).
    pub fn memory_limit_bytes(&self) -> u64 {
        self.memory_limit_mb.saturating_mul(1024 * 1024)
    }

    pub fn python_options(&self) -> PythonOptions {
        PythonOptions {
            python: self.python_path(),
            blocked_modules: self
                .blocked_modules
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            ready_timeout: self.ready_timeout,
            memory_limit_bytes: self.memory_limit_bytes(),
            max_frame_bytes: 16 * 1024 * 1024,
        }
    }

    /// The worker host binary in effect.
    pub fn worker_host_path(&self) -> PathBuf {
        if let Some(p) = &self.worker_host {
            return p.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("virtufin-worker-host")))
            .unwrap_or_else(|| PathBuf::from("/usr/bin/virtufin-worker-host"))
    }

    pub fn native_options(&self) -> NativeOptions {
        NativeOptions {
            host: self.worker_host_path(),
            ready_timeout: self.ready_timeout,
            memory_limit_bytes: self.memory_limit_bytes(),
            max_frame_bytes: 16 * 1024 * 1024,
        }
    }

    pub fn source_rules(&self) -> SourceRules {
        SourceRules {
            allow: self
                .code_url_allow
                .split(',')
                .map(|h| h.trim().trim_matches(['[', ']']).to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            max_bytes: self.max_code_bytes,
            timeout: self.code_fetch_timeout,
            nix_store: self.nix_store.clone(),
        }
    }

    pub fn check(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("VIRTUFIN_WM_MAX_ATTEMPTS must be at least 1".into());
        }
        self.link.client().map(|_| ())
    }
}
