//! Configuration helpers: the seed's `ASPNETCORE_URLS` and a clap front end
//! that turns every bad setting into one line on stderr and exit status 1.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use clap::{CommandFactory, FromArgMatches, error::ContextKind, error::ErrorKind};

/// Why a listen URL could not be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("empty URL list")]
    Empty,
    #[error("'{0}': only http:// URLs are supported (terminate TLS in front of the service)")]
    Scheme(String),
    #[error("'{0}': expected http://HOST:PORT")]
    Shape(String),
    #[error("'{0}': port must be a number between 1 and 65535")]
    Port(String),
    #[error("'{0}': host must be an IP address, localhost, '+', '*' or '[::]'")]
    Host(String),
}

/// Parses an `ASPNETCORE_URLS`-style list (`http://+:5001;http://localhost:5003`)
/// into socket addresses. `+`, `*` and `0.0.0.0` mean every IPv4 interface,
/// `[::]` every interface, `localhost` the IPv4 loopback.
pub fn parse_listen_urls(list: &str) -> Result<Vec<SocketAddr>, UrlError> {
    let mut out = Vec::new();
    for url in list
        .split([';', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        out.push(parse_listen_url(url)?);
    }
    if out.is_empty() {
        return Err(UrlError::Empty);
    }
    Ok(out)
}

fn parse_listen_url(url: &str) -> Result<SocketAddr, UrlError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| UrlError::Scheme(url.to_owned()))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| UrlError::Shape(url.to_owned()))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| UrlError::Port(url.to_owned()))?;
    let ip: IpAddr = match host {
        "+" | "*" | "0.0.0.0" => Ipv4Addr::UNSPECIFIED.into(),
        "[::]" => Ipv6Addr::UNSPECIFIED.into(),
        "localhost" => Ipv4Addr::LOCALHOST.into(),
        h => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| UrlError::Host(url.to_owned()))?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// Parses the command line (and the environment variables bound to its
/// arguments). `--help`/`--version` print and exit 0; any other problem
/// prints one line naming the setting (flag and environment variable) and
/// exits with status 1, so that systemd's journal shows the reason plainly.
pub fn parse_or_exit<T: CommandFactory + FromArgMatches>() -> T {
    let mut cmd = T::command();
    let result = cmd
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|m| T::from_arg_matches(&m));
    match result {
        Ok(v) => v,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("{}", one_line_error(&cmd, &e));
            std::process::exit(1)
        }
    }
}

/// Renders a clap error as one line that names the flag and, where the
/// argument has one, its environment variable.
pub fn one_line_error(cmd: &clap::Command, e: &clap::Error) -> String {
    let first = e
        .render()
        .to_string()
        .lines()
        .next()
        .unwrap_or("error: invalid configuration")
        .to_owned();
    let env = e.get(ContextKind::InvalidArg).and_then(|arg| {
        let arg = arg.to_string();
        let long = arg.split_whitespace().next()?.trim_start_matches("--");
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env())
            .map(|v| v.to_string_lossy().into_owned())
    });
    match env {
        Some(env) => format!("{first} (environment: {env})"),
        None => first,
    }
}

/// This instance's id: `explicit` when set, else `HOSTNAME`, else the
/// host name (gethostname(2): it works under systemd's `ProcSubset=pid`,
/// which hides /proc/sys), else `<prefix>-<random>`. Stable across restarts
/// on one host, which is what lets a restarted service take its own work
/// back at once.
pub fn instance_id(explicit: Option<&str>, prefix: &str) -> String {
    if let Some(id) = explicit.filter(|s| !s.is_empty()) {
        return id.to_owned();
    }
    if let Ok(h) = std::env::var("HOSTNAME")
        && !h.is_empty()
    {
        return h;
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("{prefix}-{}", std::process::id()))
}

/// `ASPNETCORE_URLS`-style listen addresses, as a clap value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenUrls(pub Vec<SocketAddr>);

impl ListenUrls {
    /// The addresses, each with its port replaced by `port` when given
    /// (`--http-port`).
    pub fn with_port(&self, port: Option<u16>) -> Vec<SocketAddr> {
        self.0
            .iter()
            .map(|a| port.map_or(*a, |p| SocketAddr::new(a.ip(), p)))
            .collect()
    }
}

/// clap value parser for [`ListenUrls`].
/// The systemd credential `name` (`LoadCredential=name:...`) of this
/// service, if it has one: `$CREDENTIALS_DIRECTORY/name`.
pub fn credential(name: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let path = std::path::Path::new(&dir).join(name);
    path.is_file().then_some(path)
}

pub fn parse_urls(s: &str) -> Result<ListenUrls, String> {
    parse_listen_urls(s)
        .map(ListenUrls)
        .map_err(|e| e.to_string())
}

/// clap value parser for durations such as `500ms`, `15s`, `2m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 15s, 2m)"))
}

/// clap value parser for counts that must be at least 1.
pub fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_urls() {
        let a = parse_listen_urls("http://+:5001").unwrap_or_default();
        assert_eq!(a, vec!["0.0.0.0:5001".parse().unwrap_or(a[0])]);
        let b = parse_listen_urls("http://localhost:5003;http://[::1]:5004/").unwrap_or_default();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].to_string(), "127.0.0.1:5003");
        assert_eq!(b[1].to_string(), "[::1]:5004");
    }

    #[test]
    fn bad_urls_name_the_problem() {
        assert!(matches!(
            parse_listen_urls("https://+:5001"),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            parse_listen_urls("http://+:0"),
            Err(UrlError::Port(_))
        ));
        assert!(matches!(
            parse_listen_urls("http://+:x"),
            Err(UrlError::Port(_))
        ));
        assert!(matches!(
            parse_listen_urls("http://host.example:1"),
            Err(UrlError::Host(_))
        ));
        assert!(matches!(parse_listen_urls(" ; "), Err(UrlError::Empty)));
    }
}
