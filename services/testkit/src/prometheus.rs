//! A real Prometheus server (Debian's `prometheus` package) scraping the
//! services under test, and its query API.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{free_port, which};

/// The Prometheus binary: `VIRTUFIN_TEST_PROMETHEUS`, else `prometheus`
/// from `PATH`.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VIRTUFIN_TEST_PROMETHEUS") {
        return p.into();
    }
    which("prometheus").unwrap_or_else(|| {
        panic!(
            "prometheus is not on PATH: install it (Debian: apt-get install --no-install-recommends \
             prometheus; ./scripts/test does) or set VIRTUFIN_TEST_PROMETHEUS"
        )
    })
}

/// A running Prometheus, killed on drop.
pub struct Prometheus {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping each `(job, host:port)` every
    /// `interval`; returns once it answers `/-/ready`.
    pub fn start(targets: &[(&str, String)], interval: Duration) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ms = interval.as_millis();
        let mut conf = format!(
            "global:\n  scrape_interval: {ms}ms\n  scrape_timeout: {ms}ms\n  evaluation_interval: {ms}ms\nscrape_configs:\n"
        );
        for (job, addr) in targets {
            conf.push_str(&format!(
                "  - job_name: '{job}'\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, conf).expect("prometheus.yml");
        let port = free_port();
        let child = Command::new(binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start prometheus");
        let p = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        // Prometheus has no readiness signal but its endpoint: poll it.
        while http_get(port, "/-/ready").map(|(s, _)| s) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "prometheus on port {port} did not become ready within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// The value of an instant query whose result is one sample (e.g.
    /// `sum(...)`); `None` when it has no result yet.
    pub fn query(&self, q: &str) -> Option<f64> {
        let (status, body) = http_get(self.port, &format!("/api/v1/query?query={}", encode(q)))?;
        assert_eq!(status, 200, "query {q}: {body}");
        value_of(&body)
    }

    /// Waits until `q` yields `want` (at most `within`), returning the
    /// last value seen (so the caller's assertion shows it).
    pub fn wait_for(&self, q: &str, want: f64, within: Duration) -> Option<f64> {
        let deadline = Instant::now() + within;
        loop {
            let v = self.query(q);
            if v == Some(want) || Instant::now() >= deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `"value":[<time>,"<number>"]` of the first result of a query answer.
fn value_of(body: &str) -> Option<f64> {
    let at = body.find("\"value\":[")?;
    let rest = &body[at..];
    let comma = rest.find(",\"")?;
    let rest = &rest[comma + 2..];
    let end = rest.find('"')?;
    rest[..end].parse().ok()
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.0 GET on 127.0.0.1 (the answer ends with the
/// connection): its status and body, `None` when it cannot connect.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_value_of_a_query_answer() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1764700000.123,"5"]}]}}"#;
        assert_eq!(value_of(body), Some(5.0));
        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(value_of(empty), None);
        assert_eq!(encode("a{b=\"c\"}"), "a%7Bb%3D%22c%22%7D");
    }
}
