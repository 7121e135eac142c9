//! Where a tenant's tools and models may connect: the egress policy.
//!
//! A spec registered over the API is a tenant's text, run on the operator's machine. Left
//! unchecked, its HTTP tool or model entry is a way into the operator's own network: the
//! server's `/v1/admin`, the database's port, the cloud's metadata service at 169.254.169.254.
//! So every address such a connection would go to is checked here first, after the name is
//! resolved (a name that resolves to a private address is refused like the address itself, and
//! checking the resolved address, not the name, is what keeps DNS rebinding out). The operator
//! opens what the tenants may reach with `[egress] allow` in `rein.toml`: host names, addresses
//! and CIDR ranges.
//!
//! This module only decides; the adapters that resolve names and open connections ask it.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The operator's exceptions to the closed ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Host names that may resolve to any address (lower-case, without a trailing dot).
    hosts: Vec<String>,
    /// Address ranges opened (a single address is a /32 or /128).
    nets: Vec<IpNet>,
}

/// A connection the policy refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{host}` is {range} address, which the server's egress policy closes to tenants' agents")]
pub struct EgressRefusal {
    /// The host as the URL named it.
    pub host: String,
    /// The address it resolved to (or was): for the operator's log only, since telling a
    /// tenant where an internal name points would map the operator's network for it.
    pub address: IpAddr,
    /// Which closed range the address is in (`a loopback`, `a private`, ...).
    pub range: &'static str,
}

impl EgressRefusal {
    /// The refusal behind `error`, if the egress policy refused it (found anywhere in its
    /// chain of sources, as an HTTP client's error carries its resolver's).
    pub fn behind(error: &(dyn std::error::Error + 'static)) -> Option<EgressRefusal> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(refusal) = e.downcast_ref::<EgressRefusal>() {
                return Some(refusal.clone());
            }
            next = e.source();
        }
        None
    }
}

/// A bad `[egress] allow` entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is neither a host name, an IP address nor a CIDR range (for example `10.0.0.0/8`)")]
pub struct BadAllowEntry(pub String);

impl EgressPolicy {
    /// The policy with `allow` opened: host names (`tools.internal`), addresses (`10.0.0.7`,
    /// `::1`) and CIDR ranges (`10.0.0.0/8`, `fd00::/8`).
    pub fn new<S: AsRef<str>>(allow: &[S]) -> Result<Self, BadAllowEntry> {
        let mut policy = EgressPolicy::default();
        for entry in allow {
            let text = entry.as_ref().trim();
            let bare = text.trim_start_matches('[').trim_end_matches(']');
            if let Ok(net) = bare.parse::<IpNet>() {
                policy.nets.push(net.trunc());
            } else if let Ok(address) = bare.parse::<IpAddr>() {
                policy.nets.push(IpNet::from(canonical(address)));
            } else if is_host_name(text) {
                policy.hosts.push(normal_host(text));
            } else {
                return Err(BadAllowEntry(text.to_string()));
            }
        }
        Ok(policy)
    }

    /// Whether the operator opened `host` by name: it may then resolve to any address.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = normal_host(host);
        self.hosts.contains(&host)
    }

    /// Checks one address that `host` resolved to (or is): `Ok` if it is public, or the
    /// operator opened its range or the host by name.
    pub fn check(&self, host: &str, address: IpAddr) -> Result<(), EgressRefusal> {
        let address = canonical(address);
        let Some(range) = closed_range(address) else {
            return Ok(());
        };
        if self.allows_host(host) || self.nets.iter().any(|n| n.contains(&address)) {
            return Ok(());
        }
        Err(EgressRefusal {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            address,
            range,
        })
    }

    /// Checks a URL's host when it is an address written out (`http://127.0.0.1/`,
    /// `http://[::1]/`), which no resolver sees; a host name is checked once it resolves.
    pub fn check_literal(&self, host: &str) -> Result<(), EgressRefusal> {
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(address) => self.check(host, address),
            Err(_) => Ok(()),
        }
    }
}

/// An IPv4 address carried in IPv6 (`::ffff:127.0.0.1`) is judged as the IPv4 address it is.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The closed range `address` is in, named for a message, or `None` for a public address.
pub fn closed_range(address: IpAddr) -> Option<&'static str> {
    match canonical(address) {
        IpAddr::V4(v4) => closed_v4(v4),
        IpAddr::V6(v6) => closed_v6(v6),
    }
}

fn closed_v4(a: Ipv4Addr) -> Option<&'static str> {
    let [o0, o1, o2, _] = a.octets();
    Some(if a.is_loopback() {
        "a loopback"
    } else if a.is_link_local() {
        // 169.254.169.254 is the metadata service of most clouds.
        "a link-local (cloud metadata)"
    } else if a.is_private() {
        "a private"
    } else if o0 == 100 && (64..128).contains(&o1) {
        // Carrier-grade NAT; 100.100.100.200 is one cloud's metadata service.
        "a shared (carrier-grade NAT)"
    } else if o0 == 0 || a.is_broadcast() || o0 >= 240 {
        "a reserved"
    } else if a.is_multicast() {
        "a multicast"
    } else if o0 == 192 && o1 == 0 && o2 == 0 {
        "an IETF protocol"
    } else if o0 == 198 && (o1 == 18 || o1 == 19) {
        "a benchmarking"
    } else if a.is_documentation() {
        "a documentation"
    } else {
        return None;
    })
}

fn closed_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    Some(if a.is_loopback() {
        "a loopback"
    } else if a.is_unspecified() {
        "a reserved"
    } else if s[0] & 0xffc0 == 0xfe80 {
        "a link-local (cloud metadata)"
    } else if s[0] & 0xfe00 == 0xfc00 || s[0] & 0xffc0 == 0xfec0 {
        // Unique local addresses (fd00:ec2::254 is one cloud's metadata service), and the
        // site-local ones they replaced.
        "a private"
    } else if a.is_multicast() {
        "a multicast"
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64: the IPv4 address it carries is judged instead.
        return closed_v4(carried(s[6], s[7]));
    } else if s[0] == 0x2002 {
        // 6to4: the IPv4 address it carries is judged instead.
        return closed_v4(carried(s[1], s[2]));
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        "a documentation"
    } else if s[0..6] == [0, 0, 0, 0, 0, 0] {
        // IPv4-compatible (deprecated) addresses.
        return closed_v4(carried(s[6], s[7]));
    } else {
        return None;
    })
}

/// The IPv4 address two 16-bit segments of an IPv6 address carry.
fn carried(high: u16, low: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(high) << 16) | u32::from(low))
}

fn normal_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn is_host_name(text: &str) -> bool {
    let host = text.trim_end_matches('.');
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &EgressPolicy, address: &str) -> Option<&'static str> {
        let address: IpAddr = address.parse().unwrap();
        policy.check("h", address).err().map(|r| r.range)
    }

    #[test]
    fn internal_addresses_are_closed_and_public_ones_open() {
        let p = EgressPolicy::default();
        for (address, range) in [
            ("127.0.0.1", "a loopback"),
            ("127.8.9.1", "a loopback"),
            ("::1", "a loopback"),
            ("::ffff:127.0.0.1", "a loopback"),
            ("::ffff:10.1.2.3", "a private"),
            ("169.254.169.254", "a link-local (cloud metadata)"),
            ("fe80::1", "a link-local (cloud metadata)"),
            ("fd00:ec2::254", "a private"),
            ("fec0::1", "a private"),
            ("10.0.0.1", "a private"),
            ("172.16.5.4", "a private"),
            ("172.31.255.255", "a private"),
            ("192.168.1.1", "a private"),
            ("100.100.100.200", "a shared (carrier-grade NAT)"),
            ("0.0.0.0", "a reserved"),
            ("::", "a reserved"),
            ("255.255.255.255", "a reserved"),
            ("224.0.0.1", "a multicast"),
            ("64:ff9b::7f00:1", "a loopback"),
            ("2002:a9fe:a9fe::", "a link-local (cloud metadata)"),
            ("::127.0.0.1", "a loopback"),
        ] {
            assert_eq!(refused(&p, address), Some(range), "{address}");
        }
        for address in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
        ] {
            assert_eq!(refused(&p, address), None, "{address}");
        }
    }

    #[test]
    fn the_operator_opens_hosts_addresses_and_ranges() {
        let p =
            EgressPolicy::new(&["10.1.0.0/16", "127.0.0.1", "[::1]", "Tools.Internal."]).unwrap();
        assert_eq!(refused(&p, "10.1.2.3"), None);
        assert_eq!(refused(&p, "10.2.0.1"), Some("a private"));
        assert_eq!(refused(&p, "127.0.0.1"), None);
        assert_eq!(refused(&p, "::ffff:127.0.0.1"), None);
        assert_eq!(refused(&p, "127.0.0.2"), Some("a loopback"));
        assert_eq!(refused(&p, "::1"), None);
        let internal: IpAddr = "10.9.9.9".parse().unwrap();
        assert!(p.check("tools.internal", internal).is_ok());
        assert!(p.check("TOOLS.internal.", internal).is_ok());
        assert!(p.check("other.internal", internal).is_err());
    }

    #[test]
    fn literal_hosts_are_checked_and_names_left_to_the_resolver() {
        let p = EgressPolicy::default();
        let refusal = p.check_literal("[::ffff:169.254.169.254]").unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "`::ffff:169.254.169.254` is a link-local (cloud metadata) address, which the server's egress policy closes to tenants' agents"
        );
        assert!(p.check_literal("127.0.0.1").is_err());
        assert!(p.check_literal("api.example.com").is_ok());
    }

    #[test]
    fn bad_allow_entries_are_named() {
        assert_eq!(
            EgressPolicy::new(&["http://x/"]).unwrap_err(),
            BadAllowEntry("http://x/".into())
        );
        assert!(EgressPolicy::new(&["10.0.0.0/33"]).is_err());
    }
}
