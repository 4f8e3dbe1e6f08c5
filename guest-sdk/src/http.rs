//! HTTP from inside a step: the host sends the request, under the run's
//! allowlist (`--allow-http`), with the step's idempotency key.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, host_calls};

/// Starts requests; had from [`crate::Step::http`].
pub struct Http<'s> {
    pub(crate) key: &'s str,
}

impl Http<'_> {
    /// A `GET` request.
    pub fn get(&self, url: impl Into<String>) -> Request {
        self.request("GET", url)
    }

    /// A `POST` request.
    pub fn post(&self, url: impl Into<String>) -> Request {
        self.request("POST", url)
    }

    /// A request with any method (`PUT`, `DELETE`, `PATCH`, ...).
    pub fn request(&self, method: impl Into<String>, url: impl Into<String>) -> Request {
        let inner = cairn_abi::HttpRequest {
            method: method.into(),
            url: url.into(),
            headers: vec![("idempotency-key".into(), self.key.to_string())],
            ..Default::default()
        };
        Request { inner, error: None }
    }
}

/// A request being built; [`Request::send`] sends it.
#[must_use = "a request does nothing until it is sent"]
pub struct Request {
    inner: cairn_abi::HttpRequest,
    /// A body that could not be serialized: reported by `send`.
    error: Option<Error>,
}

impl Request {
    /// Add a header. `Idempotency-Key` replaces the step's key.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into().to_ascii_lowercase();
        if name == "idempotency-key" {
            self.inner.headers.retain(|(n, _)| n != "idempotency-key");
        }
        self.inner.headers.push((name, value.into()));
        self
    }

    /// A JSON body, with `content-type: application/json`.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => {
                self.inner.body = body;
                self.inner.headers.retain(|(n, _)| n != "content-type");
                self.inner.headers.push(("content-type".into(), "application/json".into()));
            }
            Err(e) => self.error = Some(Error::permanent(format!("the request's JSON body: {e}"))),
        }
        self
    }

    /// A body of bytes.
    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.inner.body = body;
        self
    }

    /// Give up after this long (the run's `--http-timeout` caps it too).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.inner.timeout_ms = timeout.as_millis().clamp(1, u64::MAX as u128) as u64;
        self
    }

    /// Send the request and read the whole response.
    ///
    /// Any response is `Ok`, whatever its status. A network error or a
    /// timeout is an ordinary error (the step's retry policy retries it); a
    /// refused request (a host not allowed, too large a body or response, a
    /// call outside a step) is [`Error::permanent`] and was never sent.
    pub fn send(self) -> Result<Response, Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        host_calls::http(&self.inner).map(|inner| Response { inner })
    }
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Response {
    inner: cairn_abi::HttpResponse,
}

impl Response {
    pub fn status(&self) -> u16 {
        self.inner.status
    }

    /// The first header of this name (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.inner.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn body(&self) -> &[u8] {
        &self.inner.body
    }

    /// The body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.inner.body)
            .map_err(|e| Error::new(format!("the response (status {}) is not the JSON expected: {e}", self.status())))
    }
}
