//! Requests as users write them, checked into typed values: run ids,
//! directory grants, environment variables, JSON payloads, limits. The
//! command line and the HTTP API check them the same way.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ServiceError;
use crate::model::{HttpGrants, Limits, RunConfig, SecretHeader};
use crate::runtime::net_policy::HostPattern;

/// A workflow module's bytes, and how to name it to people (its path).
#[derive(Debug, Clone)]
pub struct ModuleSource {
    pub bytes: Vec<u8>,
    pub shown: String,
}

/// The module a new run executes.
#[derive(Debug, Clone)]
pub enum StartModule {
    /// Bytes to check, compile and store (a file of `cairn run` or `start`).
    Bytes(ModuleSource),
    /// A module in the store already, by hash: it was checked when it was
    /// stored (`POST /api/modules`), so starting a run reads no bytes.
    Stored { hash: String, shown: String },
}

/// `--max-module-mib` when not given.
pub const DEFAULT_MAX_MODULE_MIB: u64 = 64;

impl ModuleSource {
    /// Read a module file of at most `max_mib` MiB.
    pub fn read(path: &Path, max_mib: u64) -> Result<Self, ServiceError> {
        let shown = path.display().to_string();
        let max = usize::try_from(max_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        let bytes = read_capped_bytes(path, max).map_err(|e| match e {
            Capped::TooLarge => ServiceError::BadModule(format!(
                "module {shown} is larger than {max_mib} MiB (--max-module-mib); it was not compiled"
            )),
            Capped::Io(e) => ServiceError::BadModule(format!("cannot read module {shown}: {e}")),
        })?;
        Ok(ModuleSource { bytes, shown })
    }
}

enum Capped {
    TooLarge,
    Io(std::io::Error),
}

/// A file's bytes, refusing more than `max` without reading them all.
fn read_capped_bytes(path: &Path, max: usize) -> Result<Vec<u8>, Capped> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(Capped::Io)?;
    // Sized from the file once (a regular file); `take` still stops a file
    // that grows, or one that has no size (`/dev/zero`).
    let size = file.metadata().map_or(0, |m| m.len() as usize);
    let mut bytes = Vec::with_capacity(size.min(max) + 1);
    file.take(max as u64 + 1).read_to_end(&mut bytes).map_err(Capped::Io)?;
    if bytes.len() > max {
        return Err(Capped::TooLarge);
    }
    Ok(bytes)
}

/// A text file of at most `max` bytes (`what` names it in the error).
pub fn read_capped(path: &Path, max: usize, what: &str) -> Result<String, String> {
    match read_capped_bytes(path, max) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| format!("the {what} is not UTF-8")),
        Err(Capped::TooLarge) => Err(format!("the {what} is larger than {max} bytes (--max-payload-mib)")),
        Err(Capped::Io(e)) => Err(e.to_string()),
    }
}

/// A payload of `len` bytes within `max` (`--max-payload-mib`).
pub fn payload_size(len: usize, max: usize, what: &str) -> Result<(), ServiceError> {
    if len > max {
        return Err(ServiceError::BadInput(format!(
            "{what} is {len} bytes, more than the run's limit of {} MiB (--max-payload-mib)",
            max >> 20
        )));
    }
    Ok(())
}

/// A run to start.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub module: StartModule,
    /// The input, as JSON bytes (see [`json_payload`]).
    pub input: Vec<u8>,
    /// `None`: a new UUIDv7.
    pub run_id: Option<String>,
    pub config: RunConfig,
}

/// `text` as normalized JSON bytes; `None` is `null`.
pub fn json_payload(text: Option<&str>, what: &str) -> Result<Vec<u8>, ServiceError> {
    let value: Value = match text {
        None => Value::Null,
        Some(t) => {
            serde_json::from_str(t).map_err(|e| ServiceError::BadInput(format!("{what} is not valid JSON: {e}")))?
        }
    };
    Ok(serde_json::to_vec(&value).expect("a JSON value serializes"))
}

/// A run id people choose: 1 to 128 of `A-Z a-z 0-9 - _ . :`.
pub fn run_id(id: &str) -> Result<String, ServiceError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(id.to_string())
    } else {
        Err(ServiceError::BadInput(format!("--run-id {id:?} is not valid: use 1 to 128 of A-Z a-z 0-9 - _ . :")))
    }
}

/// A directory grant, `HOST` or `HOST::GUEST`: an existing host directory
/// (canonical) and the path the guest sees it at; `flag` names it in errors.
pub fn dir_grant(spec: &str, flag: &str) -> Result<(PathBuf, String), ServiceError> {
    let (host, guest) = match spec.split_once("::") {
        Some((h, g)) => (h, g.to_string()),
        None => (spec, spec.to_string()),
    };
    let host = Path::new(host)
        .canonicalize()
        .map_err(|e| ServiceError::BadInput(format!("{flag} {spec}: cannot use {host}: {e}")))?;
    if !host.is_dir() {
        return Err(ServiceError::BadInput(format!("{flag} {spec}: {} is not a directory", host.display())));
    }
    Ok((host, guest))
}

/// An environment variable, `KEY=VALUE`.
pub fn env_var(spec: &str) -> Result<(String, String), ServiceError> {
    match spec.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(ServiceError::BadInput(format!("--env {spec:?} is not of the form KEY=VALUE"))),
    }
}

/// A run's limits as people give them: the flags of `cairn run` and
/// `cairn start`, and in JSON (the HTTP API) the same names in snake case,
/// seconds as decimals. Missing ones take their defaults.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitArgs {
    pub max_memory: u64,
    pub max_cpu: f64,
    pub max_history: u64,
    pub max_history_mib: u64,
    pub max_payload_mib: u64,
    pub max_run_cpu: f64,
    pub max_wall: Option<f64>,
    pub max_branches: u64,
    pub max_http_response_mib: u64,
    pub http_timeout: f64,
    pub max_kv_keys: u64,
}

impl Default for LimitArgs {
    fn default() -> Self {
        let d = Limits::default();
        LimitArgs {
            max_memory: d.max_memory_mib,
            max_cpu: d.max_cpu_ms as f64 / 1000.0,
            max_history: d.max_history,
            max_history_mib: d.max_history_mib,
            max_payload_mib: d.max_payload_mib,
            max_run_cpu: d.max_run_cpu_ms as f64 / 1000.0,
            max_wall: None,
            max_branches: d.max_branches,
            max_http_response_mib: d.max_http_response_mib,
            http_timeout: d.http_timeout_ms as f64 / 1000.0,
            max_kv_keys: d.max_kv_keys,
        }
    }
}

/// The limits of a run, checked: every one positive.
pub fn limits(a: &LimitArgs) -> Result<Limits, ServiceError> {
    let seconds = |s: f64| s > 0.0 && s.is_finite() && s < 1e12;
    if !seconds(a.max_cpu) || a.max_memory == 0 {
        return Err(ServiceError::BadInput("--max-cpu and --max-memory must be positive".into()));
    }
    for (flag, ok) in [
        ("--max-history", a.max_history > 0),
        ("--max-history-mib", a.max_history_mib > 0),
        // Payload lengths travel in 32 bits between guest and host.
        ("--max-payload-mib", a.max_payload_mib > 0 && a.max_payload_mib <= 1024),
        ("--max-run-cpu", seconds(a.max_run_cpu)),
        ("--max-wall", a.max_wall.is_none_or(seconds)),
        ("--max-branches", a.max_branches > 0),
        ("--max-http-response-mib", a.max_http_response_mib > 0 && a.max_http_response_mib <= 1024),
        ("--http-timeout", seconds(a.http_timeout)),
        ("--max-kv-keys", a.max_kv_keys > 0),
    ] {
        if !ok {
            let also = if flag.ends_with("-mib") && flag != "--max-history-mib" { " (at most 1024)" } else { "" };
            return Err(ServiceError::BadInput(format!("{flag} must be a positive number{also}")));
        }
    }
    let ms = |s: f64| (s * 1000.0).ceil() as u64;
    Ok(Limits {
        max_memory_mib: a.max_memory,
        max_cpu_ms: ms(a.max_cpu),
        max_history: a.max_history,
        max_history_mib: a.max_history_mib,
        max_payload_mib: a.max_payload_mib,
        max_run_cpu_ms: ms(a.max_run_cpu),
        max_wall_ms: a.max_wall.map(ms),
        max_branches: a.max_branches,
        max_http_response_mib: a.max_http_response_mib,
        http_timeout_ms: ms(a.http_timeout),
        max_kv_keys: a.max_kv_keys,
    })
}

/// What a run may reach over HTTP, checked: `--allow-http` patterns,
/// `--allow-http-insecure`, `--http-header HOST:NAME=@env:VAR`.
pub fn http_grants(allow: &[String], insecure: bool, headers: &[String]) -> Result<HttpGrants, ServiceError> {
    for pattern in allow {
        HostPattern::parse(pattern).map_err(ServiceError::BadInput)?;
    }
    let headers = headers.iter().map(|h| secret_header(h)).collect::<Result<Vec<_>, _>>()?;
    Ok(HttpGrants { allow: allow.to_vec(), insecure, headers })
}

/// `HOST:NAME=@env:VAR` (HOST as in `--allow-http`, with a port if any:
/// the header name follows the last colon before `=`).
fn secret_header(spec: &str) -> Result<SecretHeader, ServiceError> {
    let bad = |why: &str| ServiceError::BadInput(format!("--http-header {spec:?}: {why}; expected HOST:NAME=@env:VAR"));
    let (target, var) = spec.split_once("=@env:").ok_or_else(|| bad("the value must be @env:VAR"))?;
    let (host, name) = target.rsplit_once(':').ok_or_else(|| bad("no header name"))?;
    HostPattern::parse(host).map_err(|e| bad(&e))?;
    let token =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b));
    if !token(name) {
        return Err(bad("not a header name"));
    }
    if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(bad("not an environment variable name"));
    }
    Ok(SecretHeader { host: host.to_string(), name: name.to_ascii_lowercase(), env: var.to_string() })
}

/// A key-value namespace (`--kv-namespace`): 1 to 200 letters, digits,
/// `-`, `_`, `.`, `/` or `:`.
pub fn kv_namespace(ns: &str) -> Result<String, ServiceError> {
    let ok =
        !ns.is_empty() && ns.len() <= 200 && ns.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b));
    if !ok {
        return Err(ServiceError::BadInput(format!(
            "key-value namespace {ns:?}: use 1 to 200 letters, digits, '-', '_', '.', '/' or ':'"
        )));
    }
    Ok(ns.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_in_json_use_the_flags_names_and_defaults() {
        let args: LimitArgs =
            serde_json::from_str(r#"{"max_memory": 32, "max_wall": 1.5, "max_history": 10}"#).unwrap();
        let got = limits(&args).unwrap();
        assert_eq!((got.max_memory_mib, got.max_wall_ms, got.max_history), (32, Some(1500), 10));
        assert_eq!(got.max_branches, Limits::default().max_branches);
        assert!(serde_json::from_str::<LimitArgs>(r#"{"max_memroy": 1}"#).is_err(), "a misspelt limit is refused");
        let zero = LimitArgs { max_branches: 0, ..LimitArgs::default() };
        assert!(limits(&zero).unwrap_err().to_string().contains("--max-branches"));
    }

    #[test]
    fn http_grants_and_secret_headers() {
        let g =
            http_grants(&["api.test:443".into()], false, &["api.test:443:Authorization=@env:PAY_KEY".into()]).unwrap();
        assert_eq!(
            g.headers,
            vec![SecretHeader { host: "api.test:443".into(), name: "authorization".into(), env: "PAY_KEY".into() }]
        );
        for bad in [
            "api.test:X-Key=secret",
            "api.test=@env:V",
            "api.test:X Key=@env:V",
            "api.test:X=@env:A-B",
            "http://a:X=@env:V",
        ] {
            assert!(http_grants(&[], false, &[bad.into()]).is_err(), "{bad}");
        }
        assert!(http_grants(&["https://x".into()], false, &[]).is_err());
        assert!(kv_namespace("shop/eu:1").is_ok());
        assert!(kv_namespace("").is_err() && kv_namespace("a b").is_err());
    }
}
