//! The byte form of an HTTP request a step hands the host (`http`), and of
//! the response the host stages back. Length-prefixed, little-endian: no
//! JSON, because bodies are bytes.

/// A request as the guest asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The guest's own timeout, in ms (`0`: the run's cap only).
    pub timeout_ms: u64,
}

/// A response as the host stages it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.url.len() + self.body.len());
        put_bytes(&mut out, self.method.as_bytes());
        put_bytes(&mut out, self.url.as_bytes());
        out.extend_from_slice(&self.timeout_ms.to_le_bytes());
        put_headers(&mut out, &self.headers);
        put_bytes(&mut out, &self.body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader(bytes);
        let method = r.string("method")?;
        let url = r.string("url")?;
        let timeout_ms = r.u64("timeout")?;
        let headers = r.headers()?;
        let body = r.bytes("body")?.to_vec();
        r.end()?;
        Ok(HttpRequest { method, url, headers, body, timeout_ms })
    }
}

impl HttpResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.body.len());
        out.extend_from_slice(&self.status.to_le_bytes());
        put_headers(&mut out, &self.headers);
        put_bytes(&mut out, &self.body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader(bytes);
        let status = u16::from_le_bytes(r.take(2, "status")?.try_into().expect("two bytes"));
        let headers = r.headers()?;
        let body = r.bytes("body")?.to_vec();
        r.end()?;
        Ok(HttpResponse { status, headers, body })
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_headers(out: &mut Vec<u8>, headers: &[(String, String)]) {
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (name, value) in headers {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value.as_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("the HTTP message ends inside its {what}"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("four bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("eight bytes")))
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let bytes = self.bytes(what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("the HTTP {what} is not UTF-8"))
    }

    fn headers(&mut self) -> Result<Vec<(String, String)>, String> {
        let n = self.u32("header count")? as usize;
        // Each header takes at least 8 bytes: a count past that is a lie.
        if n > self.0.len() / 8 {
            return Err("the HTTP message claims more headers than it holds".into());
        }
        (0..n).map(|_| Ok((self.string("header name")?, self.string("header value")?))).collect()
    }

    fn end(&self) -> Result<(), String> {
        if self.0.is_empty() { Ok(()) } else { Err("the HTTP message has bytes after its end".into()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let req = HttpRequest {
            method: "POST".into(),
            url: "https://pay.example.com/charges".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{\"amount\":3}".to_vec(),
            timeout_ms: 2500,
        };
        assert_eq!(HttpRequest::decode(&req.encode()).unwrap(), req);
        let resp = HttpResponse { status: 201, headers: vec![("x".into(), "y".into())], body: vec![0, 1, 2] };
        assert_eq!(HttpResponse::decode(&resp.encode()).unwrap(), resp);
    }

    #[test]
    fn refuses_truncated_and_trailing_bytes() {
        let bytes = HttpRequest { method: "GET".into(), url: "http://x".into(), ..Default::default() }.encode();
        for cut in 0..bytes.len() {
            assert!(HttpRequest::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(HttpRequest::decode(&longer).is_err());
    }
}
