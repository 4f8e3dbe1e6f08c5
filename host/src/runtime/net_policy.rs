//! Which hosts a run may reach over HTTP (`--allow-http`): patterns as
//! users write them, checked against a URL and then against every address
//! its name resolves to. The request is sent to the checked addresses only,
//! so a name that resolves elsewhere the second time (DNS rebinding) gains
//! nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use url::{Host, Url};

/// One `--allow-http` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    host: HostMatch,
    /// `None`: any port.
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    /// A name, lower case.
    Name(String),
    /// `*.example.com`: any name ending in `.example.com` (not the name itself).
    Subdomains(String),
    Ip(IpAddr),
}

impl HostPattern {
    /// `HOST[:PORT]`, `*.DOMAIN[:PORT]`, `IP`, `IPV4:PORT`, `[IPV6]:PORT`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("--allow-http {text:?}: {why}; expected HOST, HOST:PORT or *.DOMAIN[:PORT]");
        if text.contains("://") || text.contains('/') {
            return Err(bad("give a host, not a URL"));
        }
        // A bare IPv6 address has colons of its own.
        if let Ok(ip) = text.parse::<Ipv6Addr>() {
            return Ok(HostPattern { host: HostMatch::Ip(IpAddr::V6(ip)), port: None });
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => {
                (h, Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("the port is not 1-65535"))?))
            }
            _ => (text, None),
        };
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(HostPattern { host: HostMatch::Ip(ip), port });
        }
        let (wild, name) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host),
        };
        let name = name.to_ascii_lowercase();
        let label_ok =
            |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(bad("not a host name"));
        }
        let host = if wild { HostMatch::Subdomains(name) } else { HostMatch::Name(name) };
        Ok(HostPattern { host, port })
    }

    fn port_ok(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    /// The URL's host and port match (a name against names, an IP
    /// address written in the URL against IP patterns).
    fn matches_host(&self, host: &Host<&str>, port: u16) -> bool {
        if !self.port_ok(port) {
            return false;
        }
        match (&self.host, host) {
            (HostMatch::Name(n), Host::Domain(d)) => n.eq_ignore_ascii_case(d),
            (HostMatch::Subdomains(s), Host::Domain(d)) => {
                let d = d.to_ascii_lowercase();
                d.len() > s.len() + 1 && d.ends_with(s.as_str()) && d.as_bytes()[d.len() - s.len() - 1] == b'.'
            }
            (HostMatch::Ip(ip), Host::Ipv4(v4)) => canonical(*ip) == IpAddr::V4(*v4),
            (HostMatch::Ip(ip), Host::Ipv6(v6)) => canonical(*ip) == canonical(IpAddr::V6(*v6)),
            _ => false,
        }
    }

    /// This exact address (and port) is listed.
    fn matches_addr(&self, addr: SocketAddr) -> bool {
        matches!(self.host, HostMatch::Ip(ip) if canonical(ip) == canonical(addr.ip())) && self.port_ok(addr.port())
    }
}

/// A run's allowlist.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    patterns: Vec<HostPattern>,
    /// Plain `http://` beyond loopback (`--allow-http-insecure`).
    insecure: bool,
}

/// Where a checked URL may be sent: its host, port, and whether it is
/// plain HTTP.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub plain: bool,
    /// The host is an IP address written in the URL (nothing to resolve).
    pub literal: Option<IpAddr>,
}

impl Allowlist {
    pub fn new(patterns: &[String], insecure: bool) -> Result<Self, String> {
        let patterns = patterns.iter().map(|p| HostPattern::parse(p)).collect::<Result<_, _>>()?;
        Ok(Allowlist { patterns, insecure })
    }

    /// Check a URL before anything is resolved or sent.
    pub fn check_url(&self, url: &Url) -> Result<Target, String> {
        let plain = match url.scheme() {
            "https" => false,
            "http" => true,
            other => return Err(format!("{url}: only http and https URLs can be fetched, not {other}:")),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("{url}: credentials in the URL are not sent; use a header"));
        }
        let host = url.host().ok_or_else(|| format!("{url}: the URL has no host"))?;
        let port = url.port_or_known_default().unwrap_or(if plain { 80 } else { 443 });
        if !self.patterns.iter().any(|p| p.matches_host(&host, port)) {
            return Err(format!(
                "{}:{port} is not a host this run may reach; start the run with --allow-http {}",
                host_text(&host),
                host_text(&host)
            ));
        }
        let literal = match host {
            Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            Host::Domain(_) => None,
        };
        Ok(Target { host: host_text(&host), port, plain, literal })
    }

    /// Keep the resolved addresses the run may connect to: an address that
    /// is loopback, private, link-local (or otherwise not public) only if
    /// it is listed itself; plain HTTP only to loopback unless insecure.
    pub fn check_addrs(&self, target: &Target, resolved: &[SocketAddr]) -> Result<Vec<SocketAddr>, String> {
        if resolved.is_empty() {
            return Err(format!("{} resolves to no address", target.host));
        }
        let mut kept = Vec::new();
        let mut refused = None;
        for addr in resolved {
            let ip = canonical(addr.ip());
            let listed = self.patterns.iter().any(|p| p.matches_addr(*addr));
            if let Some(kind) = special(ip)
                && !listed
            {
                refused.get_or_insert(format!(
                    "{} resolves to {ip}, a {kind} address, which this run may reach only if it is listed too \
                     (--allow-http {ip})",
                    target.host
                ));
                continue;
            }
            if target.plain && !ip.is_loopback() && !self.insecure {
                refused.get_or_insert(format!(
                    "http://{}:{} is plain HTTP to a host that is not loopback; use https, or start the run \
                     with --allow-http-insecure",
                    target.host, target.port
                ));
                continue;
            }
            kept.push(*addr);
        }
        if kept.is_empty() {
            return Err(refused.unwrap_or_else(|| format!("{} has no address this run may reach", target.host)));
        }
        Ok(kept)
    }

    /// Whether an `--http-header` grant applies to this host and port.
    /// Over plain HTTP only if the grant names the port: a secret for
    /// `api.example.com` is meant for its https, not for a plain hop.
    pub fn header_applies(pattern: &str, target: &Target) -> bool {
        let Ok(p) = HostPattern::parse(pattern) else { return false };
        if target.plain && p.port.is_none() {
            return false;
        }
        let host = match target.literal {
            Some(IpAddr::V4(v4)) => Host::Ipv4(v4),
            Some(IpAddr::V6(v6)) => Host::Ipv6(v6),
            None => Host::Domain(target.host.as_str()),
        };
        p.matches_host(&host, target.port)
    }
}

fn host_text(host: &Host<&str>) -> String {
    match host {
        Host::Domain(d) => d.to_ascii_lowercase(),
        Host::Ipv4(v4) => v4.to_string(),
        Host::Ipv6(v6) => format!("[{v6}]"),
    }
}

/// An IPv4 address mapped into IPv6 is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What kind of non-public address this is, if it is one.
fn special(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if seg[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
                Some("NAT64 local-use")
            } else if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // NAT64's well-known prefix carries an IPv4 address at its end.
                special_v4(Ipv4Addr::new((seg[6] >> 8) as u8, seg[6] as u8, (seg[7] >> 8) as u8, seg[7] as u8))
            } else if seg[0] == 0x2002 {
                // 6to4 carries an IPv4 address after its prefix.
                special_v4(Ipv4Addr::new((seg[1] >> 8) as u8, seg[1] as u8, (seg[2] >> 8) as u8, seg[2] as u8))
            } else if let Some(v4) = v6.to_ipv4() {
                // The old compatible form (::a.b.c.d) carries one too.
                special_v4(v4)
            } else {
                None
            }
        }
    }
}

fn special_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let o = v4.octets();
    if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_private() {
        Some("private")
    } else if v4.is_link_local() {
        Some("link-local")
    } else if v4.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared (carrier-grade NAT)")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("protocol-assignment")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else if v4.is_broadcast() || v4.is_multicast() || o[0] >= 240 {
        Some("reserved")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(p: &[&str]) -> Allowlist {
        Allowlist::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>(), false).unwrap()
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn patterns() {
        let l = list(&["api.example.com", "*.pay.test:8443", "127.0.0.1:9000", "[::1]:81"]);
        assert!(l.check_url(&url("https://API.example.com/x")).is_ok());
        assert!(l.check_url(&url("https://api.example.com:444/x")).is_ok());
        assert!(l.check_url(&url("https://evil.example.com/")).is_err());
        assert!(l.check_url(&url("https://a.pay.test:8443/")).is_ok());
        assert!(l.check_url(&url("https://pay.test:8443/")).is_err());
        assert!(l.check_url(&url("https://a.pay.test/")).is_err());
        assert!(l.check_url(&url("https://xpay.test:8443/")).is_err());
        assert!(l.check_url(&url("http://127.0.0.1:9000/")).is_ok());
        assert!(l.check_url(&url("http://127.0.0.1:9001/")).is_err());
        assert!(l.check_url(&url("http://[::1]:81/")).is_ok());
        assert!(l.check_url(&url("ftp://api.example.com/")).is_err());
        assert!(l.check_url(&url("https://u:p@api.example.com/")).is_err());
        for bad in ["http://x.com", "a/b", "host:0", "host:99999", "", "*.", "bad host"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolved_addresses() {
        let l = list(&["svc.test", "localhost"]);
        let t = l.check_url(&url("https://svc.test/")).unwrap();
        let public: SocketAddr = "93.184.216.34:443".parse().unwrap();
        let private: SocketAddr = "10.0.0.5:443".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:443".parse().unwrap();
        assert_eq!(l.check_addrs(&t, &[private, public]).unwrap(), vec![public]);
        let nat64_public: SocketAddr = "[64:ff9b::5db8:d822]:443".parse().unwrap();
        assert!(l.check_addrs(&t, &[nat64_public]).is_ok(), "NAT64 of a public address is public");
        let e = l.check_addrs(&t, &[private]).unwrap_err();
        assert!(e.contains("10.0.0.5") && e.contains("private"), "{e}");
        assert!(l.check_addrs(&t, &[mapped]).unwrap_err().contains("loopback"));
        for ip in [
            "169.254.169.254",
            "0.0.0.0",
            "100.64.1.1",
            "198.18.0.1",
            "[fe80::1]",
            "[fd00::1]",
            "[fec0::1]",
            "[64:ff9b::a9fe:a9fe]",
            "[64:ff9b::7f00:1]",
            "[64:ff9b:1::1]",
            "[2002:a00:1::1]",
            "[::127.0.0.1]",
        ] {
            let a: SocketAddr = format!("{ip}:443").parse().unwrap();
            assert!(l.check_addrs(&t, &[a]).is_err(), "{ip}");
        }
        // localhost is listed by name, but its address is not.
        let t = l.check_url(&url("http://localhost:8080/")).unwrap();
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(l.check_addrs(&t, &[lo]).unwrap_err().contains("--allow-http 127.0.0.1"));
        let l = list(&["localhost", "127.0.0.1"]);
        assert_eq!(l.check_addrs(&t, &[lo]).unwrap(), vec![lo]);
    }

    #[test]
    fn plain_http_only_to_loopback() {
        let l = list(&["svc.test"]);
        let t = l.check_url(&url("http://svc.test/")).unwrap();
        let public: SocketAddr = "93.184.216.34:80".parse().unwrap();
        assert!(l.check_addrs(&t, &[public]).unwrap_err().contains("--allow-http-insecure"));
        let l = Allowlist::new(&["svc.test".into()], true).unwrap();
        assert!(l.check_addrs(&t, &[public]).is_ok());
    }
}
