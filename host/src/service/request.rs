//! Requests as users write them, checked into typed values: run ids,
//! directory grants, environment variables, JSON payloads, limits. The
//! command line and the HTTP API check them the same way.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ServiceError;
use crate::model::RunConfig;

/// A workflow module's bytes, and how to name it to people (its path).
#[derive(Debug, Clone)]
pub struct ModuleSource {
    pub bytes: Vec<u8>,
    pub shown: String,
}

impl ModuleSource {
    /// Read a module file.
    pub fn read(path: &Path) -> Result<Self, ServiceError> {
        let shown = path.display().to_string();
        let bytes =
            std::fs::read(path).map_err(|e| ServiceError::BadModule(format!("cannot read module {shown}: {e}")))?;
        Ok(ModuleSource { bytes, shown })
    }
}

/// A run to start.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub module: ModuleSource,
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
/// (canonical) and the path the guest sees it at.
pub fn dir_grant(spec: &str) -> Result<(PathBuf, String), ServiceError> {
    let (host, guest) = match spec.split_once("::") {
        Some((h, g)) => (h, g.to_string()),
        None => (spec, spec.to_string()),
    };
    let host = Path::new(host)
        .canonicalize()
        .map_err(|e| ServiceError::BadInput(format!("--dir {spec}: cannot use {host}: {e}")))?;
    if !host.is_dir() {
        return Err(ServiceError::BadInput(format!("--dir {spec}: {} is not a directory", host.display())));
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

/// The limits of a run: memory in MiB, CPU between host calls in seconds.
pub fn limits(max_memory_mib: u64, max_cpu_s: f64) -> Result<(u64, u64), ServiceError> {
    if !(max_cpu_s > 0.0 && max_cpu_s.is_finite()) || max_memory_mib == 0 {
        return Err(ServiceError::BadInput("--max-cpu and --max-memory must be positive".into()));
    }
    Ok((max_memory_mib, (max_cpu_s * 1000.0) as u64))
}
