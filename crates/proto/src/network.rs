//! The allowlist: which hosts (and ports) a sandbox may reach, and which
//! addresses are never reached unless named.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// `example.com`: exactly that name.
    Exact(String),
    /// `*.example.com`: any name below example.com (not example.com itself).
    Suffix(String),
    /// `203.0.113.7` or `[::1]`: that address, which may then be private.
    Ip(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub host: Host,
    /// `None`: any port.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<Rule>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl Policy {
    /// Parse "HOST[:PORT],..." where HOST is a name, `*.suffix`, an IPv4
    /// address or a bracketed IPv6 address.
    pub fn parse(s: &str) -> Result<Policy, String> {
        let mut rules = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (host, port) = if let Some(rest) = item.strip_prefix('[') {
                let (h, after) = rest
                    .split_once(']')
                    .ok_or_else(|| format!("{item:?}: missing ] after an IPv6 address"))?;
                let port = match after.strip_prefix(':') {
                    Some(p) => Some(p),
                    None if after.is_empty() => None,
                    None => return Err(format!("{item:?}: expected :PORT after ]")),
                };
                (h, port)
            } else {
                match item.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (item, None),
                }
            };
            let port = match port {
                Some(p) => Some(
                    p.parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("{item:?}: invalid port {p:?}"))?,
                ),
                None => None,
            };
            let host = host.to_ascii_lowercase();
            let host = if let Ok(ip) = host.parse::<IpAddr>() {
                Host::Ip(ip)
            } else if let Some(suffix) = host.strip_prefix("*.") {
                if !valid_name(suffix) {
                    return Err(format!("{item:?}: invalid domain {suffix:?}"));
                }
                Host::Suffix(suffix.to_string())
            } else if valid_name(&host) {
                Host::Exact(host)
            } else {
                return Err(format!("{item:?}: not a host name, *.domain or IP address"));
            };
            rules.push(Rule { host, port });
        }
        if rules.is_empty() {
            return Err("the allowlist is empty".into());
        }
        Ok(Policy { rules })
    }

    fn port_ok(r: &Rule, port: u16) -> bool {
        r.port.is_none_or(|p| p == port)
    }

    /// May a connection to the name `host` on `port` be attempted?
    pub fn allows_name(&self, host: &str, port: u16) -> bool {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        self.rules.iter().any(|r| {
            Self::port_ok(r, port)
                && match &r.host {
                    Host::Exact(n) => *n == h,
                    Host::Suffix(s) => {
                        h.len() > s.len() + 1
                            && h.ends_with(s.as_str())
                            && h.as_bytes()[h.len() - s.len() - 1] == b'.'
                    }
                    Host::Ip(_) => false,
                }
        })
    }

    /// Does the policy name this address (on this port) explicitly?
    pub fn names_ip(&self, ip: IpAddr, port: u16) -> bool {
        let ip = canonical(ip);
        self.rules
            .iter()
            .any(|r| Self::port_ok(r, port) && matches!(r.host, Host::Ip(a) if canonical(a) == ip))
    }
}

impl Rule {
    /// Does this rule allow everything `other` allows?
    pub fn covers(&self, other: &Rule) -> bool {
        let port = match (self.port, other.port) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        };
        let below = |name: &str, suffix: &str| {
            name.len() > suffix.len() + 1
                && name.ends_with(suffix)
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
        };
        port && match (&self.host, &other.host) {
            (Host::Exact(a), Host::Exact(b)) => a == b,
            (Host::Suffix(s), Host::Exact(b)) => below(b, s),
            (Host::Suffix(s), Host::Suffix(t)) => s == t || below(t, s),
            (Host::Ip(a), Host::Ip(b)) => canonical(*a) == canonical(*b),
            _ => false,
        }
    }
}

impl Policy {
    /// Does this policy allow every connection `other` allows?
    pub fn covers(&self, other: &Policy) -> bool {
        other
            .rules
            .iter()
            .all(|r| self.rules.iter().any(|mine| mine.covers(r)))
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            Host::Exact(n) => write!(f, "{n}")?,
            Host::Suffix(s) => write!(f, "*.{s}")?,
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]")?,
            Host::Ip(a) => write!(f, "{a}")?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

/// A whole network setting, as profiles, keys, jobs and `--network` spell
/// it: `none`, `host` or `allow:HOST[:PORT],...`. Parsed here, once, for
/// every caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NetworkMode {
    /// A private loopback only.
    #[default]
    None,
    /// The host's network: no isolation.
    Host,
    /// Only these hosts, through the egress proxy.
    Allow(Policy),
}

/// The longest network policy text read anywhere.
pub const NETWORK_MAX: usize = 64 * 1024;

impl NetworkMode {
    pub fn parse(s: &str) -> Result<NetworkMode, String> {
        // every rule costs memory: a bound on the text bounds them, for
        // every place a policy is read (requests, profiles, stored rows)
        if s.len() > NETWORK_MAX {
            return Err(format!(
                "a network policy is at most {NETWORK_MAX} bytes (this one has {})",
                s.len()
            ));
        }
        match s {
            "none" => Ok(NetworkMode::None),
            "host" => Ok(NetworkMode::Host),
            _ => match s.strip_prefix("allow:") {
                Some(list) => Ok(NetworkMode::Allow(Policy::parse(list)?)),
                None => Err(format!(
                    "invalid network mode {s:?}: expected none, host or allow:HOST[:PORT],..."
                )),
            },
        }
    }

    /// Does this setting allow every connection `other` allows? `none`
    /// is covered by everything, `host` covers everything.
    pub fn covers(&self, other: &NetworkMode) -> bool {
        match (self, other) {
            (_, NetworkMode::None) | (NetworkMode::Host, _) => true,
            (NetworkMode::Allow(a), NetworkMode::Allow(b)) => a.covers(b),
            _ => false,
        }
    }
}

/// On the wire a setting is the string a person would write.
impl serde::Serialize for NetworkMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parsed (and so checked) as it is read.
impl<'de> serde::Deserialize<'de> for NetworkMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        NetworkMode::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Why an address is never reached unless the policy names it: loopback,
/// private, link-local (cloud metadata 169.254.169.254 among them),
/// unique-local (fd00:ec2::254 among them), carrier-grade NAT, multicast,
/// unspecified, reserved. `None` for ordinary public addresses.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    if a == Ipv4Addr::new(169, 254, 169, 254) {
        return Some("cloud metadata address");
    }
    if a.is_loopback() {
        Some("loopback address")
    } else if a.is_private() {
        Some("private address")
    } else if a.is_link_local() {
        Some("link-local address")
    } else if a.is_unspecified() || o[0] == 0 {
        Some("unspecified address")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("carrier-grade NAT address")
    } else if a.is_multicast() || a.is_broadcast() || o[0] >= 240 {
        Some("multicast or reserved address")
    } else if (o[0] == 192 && o[1] == 0 && o[2] == 0) || (o[0] == 198 && (o[1] & 0xfe) == 18) {
        Some("reserved address")
    } else {
        None
    }
}

fn forbidden_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    if a == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return Some("cloud metadata address");
    }
    if a.is_loopback() {
        Some("loopback address")
    } else if a.is_unspecified() {
        Some("unspecified address")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local address")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique-local address")
    } else if (s[0] & 0xff00) == 0xff00 {
        Some("multicast address")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64: judge the embedded IPv4 address
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        forbidden_v4(v4)
    } else {
        None
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetworkMode::None => write!(f, "none"),
            NetworkMode::Host => write!(f, "host"),
            NetworkMode::Allow(p) => {
                write!(f, "allow:")?;
                for (i, r) in p.rules.iter().enumerate() {
                    if i > 0 {
                        write!(f, ",")?;
                    }
                    write!(f, "{r}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Policy {
        Policy::parse(s).unwrap()
    }

    #[test]
    fn parses_names_wildcards_ports_and_addresses() {
        let pol = p("api.openai.com, *.anthropic.com:443,127.0.0.1:8080,[::1]:9,[fd00::1]");
        assert!(pol.allows_name("api.openai.com", 443));
        assert!(pol.allows_name("API.OpenAI.com.", 80));
        assert!(!pol.allows_name("evil-api.openai.com", 443));
        assert!(pol.allows_name("x.y.anthropic.com", 443));
        assert!(
            !pol.allows_name("anthropic.com", 443),
            "*.d does not cover d itself"
        );
        assert!(!pol.allows_name("x.anthropic.com", 80), "port");
        assert!(!pol.allows_name("xanthropic.com", 443));
        assert!(pol.names_ip(
            "127.0.0.1"
                .parse()
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            8080
        ));
        assert!(!pol.names_ip(
            "127.0.0.1"
                .parse()
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            8081
        ));
        assert!(
            pol.names_ip(
                "::ffff:127.0.0.1"
                    .parse()
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                8080
            ),
            "mapped form"
        );
        assert!(pol.names_ip(
            "::1".parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            9
        ));
        assert!(pol.names_ip(
            "fd00::1"
                .parse()
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            1
        ));
    }

    #[test]
    fn coverage_is_narrowing_only() {
        let m = |s: &str| NetworkMode::parse(s).unwrap();
        let profile = m("allow:api.openai.com:443,*.example.com,[::1]:9");
        for narrower in [
            "none",
            "allow:api.openai.com:443",
            "allow:a.example.com:8080",
            "allow:*.x.example.com",
            "allow:*.example.com,api.openai.com:443",
            "allow:[::1]:9",
        ] {
            assert!(profile.covers(&m(narrower)), "{narrower}");
        }
        for wider in [
            "host",
            "allow:api.openai.com",
            "allow:api.openai.com:80",
            "allow:example.com",
            "allow:*.com",
            "allow:127.0.0.1:9",
            "allow:[::1]:10",
            "allow:evil-api.openai.com:443",
        ] {
            assert!(!profile.covers(&m(wider)), "{wider}");
        }
        assert!(!m("none").covers(&m("allow:x.com")));
        assert!(m("host").covers(&m("allow:127.0.0.1")));
        assert!(!m("allow:x.com").covers(&m("host")));
        assert_eq!(
            m("allow:a.com:1,*.b.org,[::1],10.0.0.1:2").to_string(),
            "allow:a.com:1,*.b.org,[::1],10.0.0.1:2"
        );
    }

    #[test]
    fn rejects_bad_entries() {
        for bad in [
            "",
            ",",
            "exa mple.com",
            "*.",
            "*",
            "host:0",
            "host:99999",
            "host:x",
            "[::1",
            "[::1]x",
            "-bad.com",
            "a..b",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn classifies_addresses() {
        for (a, bad) in [
            ("127.0.0.1", true),
            ("10.1.2.3", true),
            ("172.16.0.1", true),
            ("192.168.1.1", true),
            ("169.254.169.254", true),
            ("169.254.1.1", true),
            ("100.64.0.1", true),
            ("0.0.0.0", true),
            ("224.0.0.1", true),
            ("::1", true),
            ("fe80::1", true),
            ("fd00:ec2::254", true),
            ("fc00::1", true),
            ("::ffff:10.0.0.1", true),
            ("64:ff9b::a00:1", true),
            ("8.8.8.8", false),
            ("2606:4700:4700::1111", false),
            ("64:ff9b::808:808", false),
        ] {
            let ip: IpAddr = a.parse().unwrap_or_else(|e| panic!("{a}: {e}"));
            assert_eq!(forbidden(ip).is_some(), bad, "{a}");
        }
    }
}
