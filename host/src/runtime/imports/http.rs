//! `http`: a step's request, sent by the host. Only inside a step (whose
//! outcome is journaled: a replay returns the outcome, it does not call
//! again), only to hosts the run may reach, connected to the addresses
//! checked, with the step's idempotency key, within the run's caps.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cairn_abi::{EFFECT_FAILED, EFFECT_REFUSED, HTTP_RESPONSE, HttpRequest, HttpResponse};
use wasmtime::Caller;

use super::memory::guest_bytes;
use super::state::HostState;
use crate::model::{HttpGrants, Limits};
use crate::runtime::idempotency::idempotency_key;
use crate::runtime::net_policy::{Allowlist, Target};

/// Redirects followed (each hop checked like the first request).
const MAX_REDIRECTS: usize = 5;

/// Headers dropped when a redirect leads to another host.
const CREDENTIALS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

/// Headers the host sets itself from the URL and the body: a guest's own
/// would make the request say something other than where it goes.
const HOST_SET: [&str; 4] = ["host", "content-length", "transfer-encoding", "connection"];

/// Why a request did not produce a response.
enum Failure {
    /// Retrying may help (network, timeout): an ordinary error.
    Failed(String),
    /// Retrying cannot help (not allowed, too large): a permanent error.
    Refused(String),
}

/// `http(ptr, len) -> i64`: the response staged, or an error message.
pub(super) async fn http(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<i64> {
    caller.data_mut().enter()?;
    let st = caller.data_mut();
    let Some(live) = &st.live_step else {
        let message = "HTTP requests are allowed only inside a step (ctx.step): workflow code between steps is \
                       replayed, and a replay would send the request again";
        return Ok(stage(st, EFFECT_REFUSED, message.as_bytes().to_vec()));
    };
    let key = idempotency_key(st.run.store.db_id(), &st.run.run_id, &live.name, live.occurrence);
    let step_deadline = live.deadline;
    let max_request = st.limits.max_payload_bytes();
    if len as u32 as usize > max_request {
        let message = format!(
            "the HTTP request is {} bytes, more than the run's limit of {} MiB (--max-payload-mib)",
            len as u32, st.limits.max_payload_mib
        );
        return Ok(stage(st, EFFECT_REFUSED, message.into_bytes()));
    }
    let bytes = guest_bytes(caller, ptr, len)?;
    let st = caller.data_mut();
    let mut request = match HttpRequest::decode(&bytes) {
        Ok(r) => r,
        Err(e) => return Err(st.abi_error(format!("http: {e}"))),
    };
    if !request.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("idempotency-key")) {
        request.headers.push(("idempotency-key".into(), key));
    }
    // The whole exchange, redirects included, within the guest's timeout,
    // the run's cap and what is left of the step's own timeout.
    let mut budget = Duration::from_millis(st.limits.http_timeout_ms.max(1));
    if request.timeout_ms > 0 {
        budget = budget.min(Duration::from_millis(request.timeout_ms));
    }
    if let Some(d) = step_deadline {
        budget = budget.min(d.saturating_duration_since(Instant::now()));
    }
    let (grants, limits, stopped) = (st.http.clone(), st.limits.clone(), st.until_stopped());
    let exchange = tokio::time::timeout(budget, send(request, &grants, &limits));
    let result = tokio::select! {
        r = exchange => match r {
            Ok(r) => r,
            Err(_) => Err(Failure::Failed(format!("the HTTP request timed out after {budget:?}"))),
        },
        _ = stopped => Err(Failure::Failed("stopped".into())),
    };
    let st = caller.data_mut();
    st.enter()?;
    Ok(match result {
        Ok(response) => stage(st, HTTP_RESPONSE, response.encode()),
        Err(Failure::Failed(m)) => stage(st, EFFECT_FAILED, m.into_bytes()),
        Err(Failure::Refused(m)) => stage(st, EFFECT_REFUSED, m.into_bytes()),
    })
}

fn stage(st: &mut HostState, status: i64, bytes: Vec<u8>) -> i64 {
    st.staged = bytes;
    (status << 32) | st.staged.len() as i64
}

/// Send the request, following redirects whose every hop passes the checks.
async fn send(mut request: HttpRequest, grants: &HttpGrants, limits: &Limits) -> Result<HttpResponse, Failure> {
    let allow = Allowlist::new(&grants.allow, grants.insecure).map_err(Failure::Refused)?;
    let mut url = url::Url::parse(&request.url).map_err(|e| Failure::Refused(format!("{}: {e}", request.url)))?;
    let mut method = reqwest::Method::from_bytes(request.method.as_bytes())
        .map_err(|_| Failure::Refused(format!("{:?} is not an HTTP method", request.method)))?;
    for hop in 0..=MAX_REDIRECTS {
        let target = allow.check_url(&url).map_err(|e| Failure::Refused(refusal(hop, e)))?;
        let addrs = resolve(&target).await?;
        let addrs = allow.check_addrs(&target, &addrs).map_err(|e| Failure::Refused(refusal(hop, e)))?;
        let response = exchange(&url, &method, &request, &target, &addrs, grants, limits).await?;
        let location = response.headers.iter().find(|(n, _)| n == "location").map(|(_, v)| v.clone());
        let next = match (response.status, location) {
            (301 | 302 | 303 | 307 | 308, Some(location)) => location,
            _ => return Ok(response),
        };
        if hop == MAX_REDIRECTS {
            return Err(Failure::Refused(format!("more than {MAX_REDIRECTS} redirects, the last to {next}")));
        }
        let next = url.join(&next).map_err(|e| Failure::Refused(format!("a redirect to {next:?}: {e}")))?;
        // As browsers do: credentials the guest set go to the host it named,
        // not to another one a redirect names.
        if next.host_str() != url.host_str()
            || next.port_or_known_default() != url.port_or_known_default()
            || next.scheme() != url.scheme()
        {
            request.headers.retain(|(n, _)| !CREDENTIALS.iter().any(|c| n.eq_ignore_ascii_case(c)));
        }
        url = next;
        // As browsers do: 303, and 301/302 after a POST, continue as GET.
        if response.status == 303 || (matches!(response.status, 301 | 302) && method == reqwest::Method::POST) {
            method = reqwest::Method::GET;
            request.body.clear();
            request.headers.retain(|(n, _)| !n.eq_ignore_ascii_case("content-type"));
        }
    }
    unreachable!("the loop returns by its last hop")
}

fn refusal(hop: usize, why: String) -> String {
    if hop == 0 { why } else { format!("a redirect was not followed: {why}") }
}

async fn resolve(target: &Target) -> Result<Vec<SocketAddr>, Failure> {
    if let Some(ip) = target.literal {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
        Ok(addrs) => Ok(addrs.collect()),
        Err(e) => Err(Failure::Failed(format!("cannot resolve {}: {e}", target.host))),
    }
}

/// One request to the checked addresses; the response read whole, within
/// `--max-http-response-mib`.
async fn exchange(
    url: &url::Url,
    method: &reqwest::Method,
    request: &HttpRequest,
    target: &Target,
    addrs: &[SocketAddr],
    grants: &HttpGrants,
    limits: &Limits,
) -> Result<HttpResponse, Failure> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .use_rustls_tls()
        .pool_max_idle_per_host(0);
    if target.literal.is_none() {
        builder = builder.resolve_to_addrs(&target.host, addrs);
    }
    let client = builder.build().map_err(|e| Failure::Failed(format!("cannot make an HTTP client: {e}")))?;
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in request.headers.iter().filter(|(n, _)| !HOST_SET.iter().any(|h| n.eq_ignore_ascii_case(h))) {
        let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Failure::Refused(format!("{name:?} is not a header name")))?;
        let value = reqwest::header::HeaderValue::from_str(value)
            .map_err(|_| Failure::Refused(format!("the value of header {name} is not a header value")))?;
        headers.append(name, value);
    }
    // Secrets from the host's environment, for this host only: they
    // replace whatever the guest set under the same name.
    for grant in grants.headers.iter().filter(|g| Allowlist::header_applies(&g.host, target)) {
        let value = std::env::var(&grant.env).map_err(|_| {
            Failure::Failed(format!(
                "the host has no environment variable {} for the header {} (--http-header)",
                grant.env, grant.name
            ))
        })?;
        let name = reqwest::header::HeaderName::from_bytes(grant.name.as_bytes())
            .map_err(|_| Failure::Refused(format!("{:?} is not a header name", grant.name)))?;
        let mut value = reqwest::header::HeaderValue::from_str(&value)
            .map_err(|_| Failure::Refused(format!("the value of {} is not a header value", grant.env)))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    let sent = client.request(method.clone(), url.clone()).headers(headers).body(request.body.clone()).send().await;
    let mut response = sent.map_err(|e| Failure::Failed(format!("{} {url}: {}", method, error_chain(&e))))?;
    let max = usize::try_from(limits.max_http_response_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    let too_large = || {
        Failure::Refused(format!(
            "the response of {url} is larger than the run's limit of {} MiB (--max-http-response-mib)",
            limits.max_http_response_mib
        ))
    };
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(Failure::Failed(format!("reading the response of {url}: {}", error_chain(&e)))),
        }
    }
    Ok(HttpResponse { status, headers, body })
}

/// reqwest's errors say little at the top ("error sending request"): the
/// causes say what happened (connection refused, certificate invalid).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
