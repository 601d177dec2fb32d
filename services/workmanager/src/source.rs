//! Where worker code comes from (`CodeSource`): the bytes themselves, an
//! http(s) URL, or a Nix store path pinned by its NAR hash.
//!
//! - URL: the host must be on `VIRTUFIN_CODE_URL_ALLOW` when that list is
//!   set; the name is resolved once and every address checked — private,
//!   loopback, link-local, unique-local, unspecified, multicast and other
//!   non-global addresses are refused unless the host is on the list — and
//!   the request goes to exactly the checked addresses (no second lookup
//!   for a rebinding to exploit). Redirects are refused; the body is
//!   capped at the code size limit; the optional `sha256` (hex) is checked.
//! - Nix: the `url` field holds `nix:/nix/store/<hash>-<name>[/sub/path]`
//!   (or `file:///nix/store/...`) — the proto has no field of its own for
//!   it and its field numbers are a contract — and `sha256` holds the store
//!   path's NAR hash, required, as SRI `sha256-<base64>` (what
//!   `nix path-info --json` prints), `sha256:<nix base-32>` or 64 hex
//!   digits. The path is resolved
//!   (symlinks followed) and must stay inside the store; the whole store
//!   path is serialised as a NAR and hashed, and the code is the file the
//!   URL names inside it.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Component, Path, PathBuf},
    time::Duration,
};

use base64::Engine as _;
use futures_util::StreamExt;
use virtufin_common::ApiError;

/// How a worker's code was given (for the audit log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Content,
    Url,
    Nix,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Content => "content",
            SourceKind::Url => "url",
            SourceKind::Nix => "nix",
        }
    }
}

/// The rules for fetching code.
#[derive(Debug, Clone)]
pub struct SourceRules {
    /// Hosts URLs may name (lower case); empty: any public host.
    pub allow: Vec<String>,
    pub max_bytes: usize,
    pub timeout: Duration,
    /// The Nix store (`/nix/store`; tests point it elsewhere).
    pub nix_store: PathBuf,
}

/// Whether an address is somewhere a code URL must not reach unless its
/// host is allow-listed by name.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                // 100.64.0.0/10, carrier-grade NAT
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                // 198.18.0.0/15, benchmarking
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // fc00::/7, unique local
                || (s[0] & 0xfe00) == 0xfc00
                // fe80::/10, link-local
                || (s[0] & 0xffc0) == 0xfe80
                // 2001:db8::/32, documentation
                || (s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

fn refused(msg: impl Into<String>) -> ApiError {
    ApiError::failed_precondition(msg)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fetches the code at an http(s) URL under `rules`.
pub async fn fetch_url(rules: &SourceRules, raw: &str) -> Result<Vec<u8>, ApiError> {
    let url = reqwest::Url::parse(raw)
        .map_err(|e| ApiError::invalid(format!("code_source.url '{raw}' is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ApiError::invalid(format!(
            "code_source.url must be http(s) (or nix:/nix/store/... for a Nix store path), not {}:",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ApiError::invalid(
            "code_source.url must not carry credentials",
        ));
    }
    let Some(host) = url
        .host_str()
        .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
    else {
        return Err(ApiError::invalid("code_source.url has no host"));
    };
    let listed = rules.allow.contains(&host);
    if !rules.allow.is_empty() && !listed {
        return Err(refused(format!(
            "code URLs may only name the hosts on VIRTUFIN_CODE_URL_ALLOW ({}); '{host}' is not one of them",
            rules.allow.join(", ")
        )));
    }
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::time::timeout(
            rules.timeout,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        .map_err(|_| ApiError::unavailable(format!("resolving '{host}' timed out")))?
        .map_err(|e| ApiError::unavailable(format!("cannot resolve '{host}': {e}")))?
        .collect(),
    };
    if addrs.is_empty() {
        return Err(ApiError::unavailable(format!("'{host}' has no address")));
    }
    if !listed && let Some(bad) = addrs.iter().find(|a| is_internal(a.ip())) {
        return Err(refused(format!(
            "code URL host '{host}' resolves to {}, a private, loopback, link-local or otherwise internal address; \
             add '{host}' to VIRTUFIN_CODE_URL_ALLOW to allow it",
            bad.ip()
        )));
    }
    // Connect to exactly the addresses checked above.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(rules.timeout)
        .resolve_to_addrs(&host, &addrs)
        .build()
        .map_err(|e| ApiError::new(tonic::Code::Internal, e.to_string()))?;
    let resp = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| ApiError::unavailable(format!("fetching {url}: {e}")))?;
    let status = resp.status();
    if status.is_redirection() {
        return Err(refused(format!(
            "{url} answered {status} (a redirect to {}); redirects are not followed: give the final URL",
            resp.headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
        )));
    }
    if !status.is_success() {
        return Err(refused(format!("{url} answered {status}")));
    }
    let too_big = |n: u64| {
        ApiError::invalid(format!(
            "the code at {url} is {n} bytes or more; the limit is {} (VIRTUFIN_WM_MAX_CODE_BYTES)",
            rules.max_bytes
        ))
    };
    if let Some(n) = resp.content_length()
        && n > rules.max_bytes as u64
    {
        return Err(too_big(n));
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::unavailable(format!("fetching {url}: {e}")))?;
        if body.len() + chunk.len() > rules.max_bytes {
            return Err(too_big((body.len() + chunk.len()) as u64));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The store path a `nix:`/`file:` URL names, if it is one.
pub fn nix_path(raw: &str) -> Option<&str> {
    raw.strip_prefix("nix:")
        .or_else(|| raw.strip_prefix("file://"))
}

/// Nix's base-32 (its own alphabet, least significant digit last).
fn nix32_decode(s: &str) -> Option<[u8; 32]> {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    if s.len() != 52 {
        return None;
    }
    let mut out = [0u8; 32];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = ALPHABET.iter().position(|&a| a == c)? as u16;
        let (i, j) = (n * 5 / 8, n * 5 % 8);
        let v = digit << j;
        out[i] |= (v & 0xff) as u8;
        let high = (v >> 8) as u8;
        if i + 1 < 32 {
            out[i + 1] |= high;
        } else if high != 0 {
            return None;
        }
    }
    Some(out)
}

/// Parses a NAR hash: SRI `sha256-<base64>`, `sha256:<nix base-32>` (or
/// the 52 base-32 digits alone, as `nix-hash --type sha256 --base32`
/// prints), or 64 hex digits.
pub fn parse_nar_hash(h: &str) -> Result<[u8; 32], ApiError> {
    let bad = || {
        ApiError::invalid(format!(
            "sha256 must be the store path's NAR hash: SRI 'sha256-<base64>' (nix path-info --json), 'sha256:<base-32>' or 64 hex digits; got '{h}'"
        ))
    };
    let b32 = h.strip_prefix("sha256:").unwrap_or(h);
    if b32.len() == 52 {
        return nix32_decode(b32).ok_or_else(bad);
    }
    let bytes = if let Some(b64) = h.strip_prefix("sha256-") {
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad())?
    } else if h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad())?
    } else {
        return Err(bad());
    };
    bytes.try_into().map_err(|_| bad())
}

/// Reads the code at a Nix store path after checking the store path's NAR
/// hash.
pub async fn read_nix(
    rules: &SourceRules,
    path: &str,
    nar_hash: &str,
) -> Result<Vec<u8>, ApiError> {
    if nar_hash.is_empty() {
        return Err(ApiError::invalid(
            "a Nix store path needs its NAR hash in code_source.sha256 (SRI 'sha256-<base64>', see nix path-info --json)",
        ));
    }
    let want = parse_nar_hash(nar_hash)?;
    let rules = rules.clone();
    let path = PathBuf::from(path);
    tokio::task::spawn_blocking(move || read_nix_blocking(&rules, &path, &want))
        .await
        .map_err(|e| ApiError::new(tonic::Code::Internal, e.to_string()))?
}

fn read_nix_blocking(
    rules: &SourceRules,
    path: &Path,
    want: &[u8; 32],
) -> Result<Vec<u8>, ApiError> {
    use sha2::Digest;
    let outside = || {
        ApiError::invalid(format!(
            "{} is not inside the Nix store {}",
            path.display(),
            rules.nix_store.display()
        ))
    };
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(outside());
    }
    let store = rules.nix_store.canonicalize().map_err(|e| {
        ApiError::failed_precondition(format!("the Nix store {}: {e}", rules.nix_store.display()))
    })?;
    let rel = path.strip_prefix(&rules.nix_store).map_err(|_| outside())?;
    let Some(Component::Normal(item)) = rel.components().next() else {
        return Err(outside());
    };
    let store_path = store.join(item);
    let file = store
        .join(rel)
        .canonicalize()
        .map_err(|e| ApiError::not_found(format!("{}: {e}", path.display())))?;
    // Symlinks may not lead out of the store item.
    let item_real = store_path
        .canonicalize()
        .map_err(|e| ApiError::not_found(format!("{}: {e}", store_path.display())))?;
    if !item_real.starts_with(&store) || !file.starts_with(&item_real) {
        return Err(outside());
    }
    let meta = std::fs::metadata(&file)
        .map_err(|e| ApiError::not_found(format!("{}: {e}", file.display())))?;
    if !meta.is_file() {
        return Err(ApiError::invalid(format!(
            "{} is not a file: name the worker's file inside the store path",
            path.display()
        )));
    }
    if meta.len() > rules.max_bytes as u64 {
        return Err(ApiError::invalid(format!(
            "{} is {} bytes; the limit is {} (VIRTUFIN_WM_MAX_CODE_BYTES)",
            path.display(),
            meta.len(),
            rules.max_bytes
        )));
    }
    let mut nar = nix_nar::Encoder::new(&store_path).map_err(|e| {
        ApiError::failed_precondition(format!("cannot serialise {}: {e}", store_path.display()))
    })?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut nar, &mut h).map_err(|e| {
        ApiError::failed_precondition(format!("cannot serialise {}: {e}", store_path.display()))
    })?;
    let got: [u8; 32] = h.finalize().into();
    if &got != want {
        return Err(ApiError::failed_precondition(format!(
            "the NAR hash of {} is sha256-{} ({}), not the pinned one",
            store_path.display(),
            base64::engine::general_purpose::STANDARD.encode(got),
            hex(&got)
        )));
    }
    std::fs::read(&file).map_err(|e| ApiError::not_found(format!("{}: {e}", file.display())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn internal_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "ff02::1",
        ] {
            assert!(is_internal(a.parse().unwrap()), "{a}");
        }
        for a in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(!is_internal(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn nar_hash_forms() {
        let hex64 = "00".repeat(32);
        assert_eq!(parse_nar_hash(&hex64).unwrap(), [0u8; 32]);
        let sri = format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 32])
        );
        assert_eq!(parse_nar_hash(&sri).unwrap(), [7u8; 32]);
        // nix-hash --type sha256 --base32 and sha256sum of nix-store --dump
        // on the same directory.
        let b32 = "1pwysh4c965phixr8srp0nph993ah9nwc7qhzx71nd3dbiksxs31";
        let want = "61e8ae675c6d341b4eff101fc66d826aa404af05376b947b84b798c408d49edf";
        assert_eq!(hex(&parse_nar_hash(b32).unwrap()), want);
        assert_eq!(
            hex(&parse_nar_hash(&format!("sha256:{b32}")).unwrap()),
            want
        );
        assert!(
            parse_nar_hash("sha256:epwysh4c965phixr8srp0nph993ah9nwc7qhzx71nd3dbiksxs31").is_err()
        );
        assert!(parse_nar_hash("sha256-short").is_err());
    }
}
