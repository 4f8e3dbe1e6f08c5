//! A fake payment service for the effects tests and `make demo-ecommerce`,
//! idempotent the way Stripe is: the first request with an
//! `Idempotency-Key` is acted on and its response stored; a repeat of the
//! key gets the stored response (`Idempotent-Replayed: true`) and changes
//! nothing.
//!
//! Routes: `POST /charges {"amount_cents", "order_id"}`, `POST /refunds
//! {"charge_id"}`, `GET /stats` (requests per key, charges, refunds), and
//! for the allowlist tests `GET /ok`, `GET /redirect?to=URL`, `GET
//! /big?bytes=N` and `GET /slow?ms=N`.
//!
//! Listens on 127.0.0.1 on a free port (or `--port`) and prints its URL on
//! stdout; exits when its stdin closes (the test or demo that started it
//! is gone) or after `--max-seconds` (600 by default). With `--api-key K`,
//! requests without `x-api-key: K` get 401.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Read as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Default)]
struct Ledger {
    /// Requests seen per idempotency key (repeats included).
    requests: BTreeMap<String, u64>,
    /// The stored response per key: status and body.
    responses: BTreeMap<String, (u16, Value)>,
    charges: Vec<Value>,
    refunds: Vec<Value>,
}

struct Service {
    ledger: Mutex<Ledger>,
    api_key: Option<String>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut port, mut max_seconds, mut api_key) = (0u16, 600u64, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()).expect("--port N"),
            "--max-seconds" => max_seconds = args.next().and_then(|p| p.parse().ok()).expect("--max-seconds N"),
            "--api-key" => api_key = args.next(),
            other => panic!("fake-payments: unknown argument {other}"),
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind 127.0.0.1");
        println!("http://{}", listener.local_addr().expect("address"));
        let service = Arc::new(Service { ledger: Mutex::default(), api_key });
        // Stop when whoever started us is gone (stdin closes), or at the latest after max_seconds.
        let (gone_tx, gone) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = [0u8; 64];
            while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
            let _ = gone_tx.send(());
        });
        let serve = async {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let service = service.clone();
                tokio::spawn(async move {
                    let handler = hyper::service::service_fn(move |req| handle(service.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), handler)
                        .await;
                });
            }
        };
        tokio::select! {
            _ = serve => {}
            _ = gone => {}
            _ = tokio::time::sleep(Duration::from_secs(max_seconds)) => {}
        }
    });
}

fn reply(status: u16, body: Value, replayed: bool) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).expect("status");
    r.headers_mut().insert("content-type", "application/json".parse().expect("header"));
    if replayed {
        r.headers_mut().insert("idempotent-replayed", "true".parse().expect("header"));
    }
    r
}

async fn handle(service: Arc<Service>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let query: BTreeMap<String, String> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3A", ":").replace("%2F", "/")))
        .collect();
    let path = parts.uri.path();
    match (parts.method.as_str(), path) {
        ("GET", "/redirect") => {
            let to = query.get("to").cloned().unwrap_or_default();
            let mut r = reply(302, json!({}), false);
            r.headers_mut().insert("location", to.parse().unwrap_or_else(|_| "/".parse().expect("header")));
            return Ok(r);
        }
        ("GET", "/big") => {
            let n: usize = query.get("bytes").and_then(|b| b.parse().ok()).unwrap_or(0);
            return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; n]))));
        }
        ("GET", "/ok") => return Ok(reply(200, json!({"ok": true}), false)),
        ("GET", "/slow") => {
            let ms: u64 = query.get("ms").and_then(|b| b.parse().ok()).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            return Ok(reply(200, json!({"ok": true}), false));
        }
        ("GET", "/stats") => {
            let l = service.ledger.lock().expect("ledger");
            return Ok(reply(200, json!({"requests": l.requests, "charges": l.charges, "refunds": l.refunds}), false));
        }
        _ => {}
    }
    if let Some(expected) = &service.api_key
        && parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(expected.as_str())
    {
        return Ok(reply(401, json!({"error": "missing or wrong x-api-key"}), false));
    }
    let Some(key) = parts.headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string) else {
        return Ok(reply(400, json!({"error": "an Idempotency-Key header is required"}), false));
    };
    let input: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut l = service.ledger.lock().expect("ledger");
    *l.requests.entry(key.clone()).or_default() += 1;
    if let Some((status, body)) = l.responses.get(&key) {
        return Ok(reply(*status, body.clone(), true));
    }
    let (status, body) = match (parts.method.as_str(), path) {
        ("POST", "/charges") => {
            let charge = json!({
                "id": format!("ch_{}", l.charges.len() + 1),
                "amount_cents": input["amount_cents"],
                "order_id": input["order_id"],
                "status": "succeeded",
            });
            l.charges.push(charge.clone());
            (201, charge)
        }
        ("POST", "/refunds") => {
            let refund = json!({"id": format!("re_{}", l.refunds.len() + 1), "charge_id": input["charge_id"]});
            l.refunds.push(refund.clone());
            (201, refund)
        }
        _ => (404, json!({"error": format!("no route {} {path}", parts.method)})),
    };
    l.responses.insert(key, (status, body.clone()));
    Ok(reply(status, body, false))
}
