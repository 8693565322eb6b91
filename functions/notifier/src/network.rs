//! Which webhook targets may be contacted: the guard against server-side request forgery.
//!
//! A webhook URL is operator configuration, but the notifier still refuses to POST to places a
//! URL should never lead: anything but `http`/`https`, and addresses that are not on the public
//! internet. Every address a host name resolves to is classified ([`classify`]); the request
//! goes out only if **all** of them are permitted, and the HTTP client connects through
//! [`PolicyResolver`], so it only ever connects to an address that was checked in that same
//! lookup (a DNS answer that changes between a check and the connection, "DNS rebinding",
//! cannot slip an internal address in). IP literals are checked directly. Redirects are not
//! followed and proxies are not used, so neither can route around the check.
//!
//! | class | ranges | default |
//! |---|---|---|
//! | public | everything else | allowed |
//! | `loopback` | 127.0.0.0/8, ::1 | refused |
//! | `private` | 10/8, 172.16/12, 192.168/16, 100.64/10 (carrier-grade NAT), fc00::/7, fec0::/10 | refused |
//! | `link_local` | 169.254/16, fe80::/10 | refused |
//! | `metadata` | cloud metadata services: 169.254.169.254, 169.254.170.2, 100.100.100.200, fd00:ec2::254 | refused |
//! | blocked | 0/8, ::, multicast, broadcast, 240/4, documentation and benchmarking ranges, 192.0.0/24, Teredo, discard | always refused |
//!
//! IPv4-mapped (`::ffff:a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`) addresses are
//! classified by the IPv4 address they carry. The refused classes can be allowed per endpoint
//! or globally (`loopback` for tests and local development); metadata services only by naming
//! `metadata` itself, never by allowing `link_local` or `private`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde::{Deserialize, Serialize};

/// What kind of network an address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClass {
    /// The public internet.
    Public,
    /// An address that may be allowed.
    Restricted(AllowedNetwork),
    /// Never a webhook target (unspecified, multicast, broadcast, reserved, documentation).
    Blocked,
}

/// Restricted address classes an operator may allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllowedNetwork {
    /// 127.0.0.0/8 and ::1.
    Loopback,
    /// RFC 1918, carrier-grade NAT and IPv6 unique-local ranges.
    Private,
    /// 169.254/16 and fe80::/10, except the metadata services.
    LinkLocal,
    /// Cloud instance metadata services.
    Metadata,
}

impl AllowedNetwork {
    /// The name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            AllowedNetwork::Loopback => "loopback",
            AllowedNetwork::Private => "private",
            AllowedNetwork::LinkLocal => "link_local",
            AllowedNetwork::Metadata => "metadata",
        }
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressClass::Public => f.write_str("public"),
            AddressClass::Restricted(network) => f.write_str(network.as_str()),
            AddressClass::Blocked => f.write_str("blocked"),
        }
    }
}

/// Classifies an address (see the module docs for the table).
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    use AddressClass::{Blocked, Public, Restricted};
    use AllowedNetwork::{LinkLocal, Loopback, Metadata, Private};
    let [a, b, c, d] = ip.octets();
    match (a, b, c, d) {
        (169, 254, 169, 254) | (169, 254, 170, 2) | (100, 100, 100, 200) => Restricted(Metadata),
        (0, ..) => Blocked,
        (127, ..) => Restricted(Loopback),
        (10, ..) | (192, 168, ..) => Restricted(Private),
        (172, 16..=31, ..) => Restricted(Private),
        (100, 64..=127, ..) => Restricted(Private),
        (169, 254, ..) => Restricted(LinkLocal),
        // IETF protocol assignments, documentation (TEST-NET-1/2/3), benchmarking.
        (192, 0, 0, _) | (192, 0, 2, _) | (198, 51, 100, _) | (203, 0, 113, _) => Blocked,
        (198, 18..=19, ..) => Blocked,
        // Multicast, reserved, broadcast.
        (224..=255, ..) => Blocked,
        _ => Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    use AddressClass::{Blocked, Public, Restricted};
    use AllowedNetwork::{LinkLocal, Loopback, Metadata, Private};
    if ip.is_unspecified() {
        return Blocked;
    }
    if ip.is_loopback() {
        return Restricted(Loopback);
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let segments = ip.segments();
    // fd00:ec2::254, the EC2 metadata service over IPv6.
    if segments == [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254] {
        return Restricted(Metadata);
    }
    let embedded = |high: u16, low: u16| {
        let [a, b] = high.to_be_bytes();
        let [c, d] = low.to_be_bytes();
        classify_v4(Ipv4Addr::new(a, b, c, d))
    };
    match segments {
        // NAT64 well-known prefix: the last 32 bits are an IPv4 address.
        [0x64, 0xff9b, 0, 0, 0, 0, high, low] => embedded(high, low),
        // 6to4: bits 16–47 are an IPv4 address.
        [0x2002, high, low, ..] => embedded(high, low),
        // Other ::/96 (IPv4-compatible, deprecated) and the discard prefix 100::/64.
        [0, 0, 0, 0, 0, 0, ..] | [0x100, 0, 0, 0, ..] => Blocked,
        // Teredo (can tunnel to anything) and documentation.
        [0x2001, 0, ..] | [0x2001, 0xdb8, ..] => Blocked,
        [first, ..] if first & 0xffc0 == 0xfe80 => Restricted(LinkLocal),
        [first, ..] if first & 0xffc0 == 0xfec0 => Restricted(Private),
        [first, ..] if first & 0xfe00 == 0xfc00 => Restricted(Private),
        [first, ..] if first & 0xff00 == 0xff00 => Blocked,
        _ => Public,
    }
}

/// A refused webhook target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetRefused {
    /// The URL's scheme is not `http` or `https`.
    #[error("scheme {scheme:?} is not http or https")]
    Scheme {
        /// The scheme found.
        scheme: String,
    },
    /// The URL has no host.
    #[error("the URL has no host")]
    NoHost,
    /// The host is, or resolves to, an address the policy refuses.
    #[error("{host} is {address}, a {class} address the endpoint is not allowed to reach")]
    Address {
        /// The host as written in the URL.
        host: String,
        /// The refused address.
        address: IpAddr,
        /// Its class.
        class: AddressClass,
    },
    /// The host resolved to no address at all.
    #[error("{host} resolved to no address")]
    NoAddress {
        /// The host as written in the URL.
        host: String,
    },
}

/// Which restricted networks one endpoint may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    allowed: BTreeSet<AllowedNetwork>,
}

impl NetworkPolicy {
    /// Public addresses only, plus `allowed`.
    pub fn allowing(allowed: impl IntoIterator<Item = AllowedNetwork>) -> Self {
        NetworkPolicy {
            allowed: allowed.into_iter().collect(),
        }
    }

    /// Whether `ip` may be contacted.
    pub fn permits(&self, ip: IpAddr) -> bool {
        match classify(ip) {
            AddressClass::Public => true,
            AddressClass::Restricted(network) => self.allowed.contains(&network),
            AddressClass::Blocked => false,
        }
    }

    /// Checks one address of `host`.
    ///
    /// # Errors
    /// [`TargetRefused::Address`] when the policy refuses it.
    pub fn check_address(&self, host: &str, address: IpAddr) -> Result<(), TargetRefused> {
        if self.permits(address) {
            Ok(())
        } else {
            Err(TargetRefused::Address {
                host: host.to_owned(),
                address,
                class: classify(address),
            })
        }
    }

    /// Checks what can be checked without DNS: the scheme, a host, and the address when the
    /// host is an IP literal (which the HTTP client connects to without asking the resolver).
    ///
    /// # Errors
    /// See [`TargetRefused`].
    pub fn check_url(&self, url: &Url) -> Result<(), TargetRefused> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(TargetRefused::Scheme {
                scheme: url.scheme().to_owned(),
            });
        }
        match url.host() {
            None => Err(TargetRefused::NoHost),
            Some(url::Host::Ipv4(ip)) => self.check_address(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_address(&ip.to_string(), IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => Ok(()),
        }
    }

    /// Resolves `host` and checks every address; all must be permitted.
    ///
    /// # Errors
    /// [`ResolveError::Refused`] for a refused address, [`ResolveError::Lookup`] when the
    /// lookup itself fails.
    pub async fn resolve(&self, host: &str) -> Result<Vec<SocketAddr>, ResolveError> {
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|source| ResolveError::Lookup {
                host: host.to_owned(),
                message: source.to_string(),
            })?
            .collect();
        if found.is_empty() {
            return Err(ResolveError::Refused(TargetRefused::NoAddress {
                host: host.to_owned(),
            }));
        }
        for address in &found {
            self.check_address(host, address.ip())
                .map_err(ResolveError::Refused)?;
        }
        Ok(found)
    }
}

/// Why [`NetworkPolicy::resolve`] gave no addresses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The policy refuses the target.
    #[error(transparent)]
    Refused(TargetRefused),
    /// DNS failed (may be transient).
    #[error("cannot resolve {host}: {message}")]
    Lookup {
        /// The host.
        host: String,
        /// The resolver's account.
        message: String,
    },
}

/// The HTTP client's resolver: [`NetworkPolicy::resolve`], so every connection goes to an
/// address checked in the same lookup.
#[derive(Debug, Clone)]
pub struct PolicyResolver {
    policy: Arc<NetworkPolicy>,
}

impl PolicyResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: NetworkPolicy) -> Self {
        PolicyResolver {
            policy: Arc::new(policy),
        }
    }
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let found = policy.resolve(name.as_str()).await?;
            let addrs: Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

/// The [`TargetRefused`] somewhere in an error's source chain (the HTTP client wraps what
/// [`PolicyResolver`] returns), if any.
pub fn refusal_in(error: &(dyn std::error::Error + 'static)) -> Option<TargetRefused> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(ResolveError::Refused(refused)) = error.downcast_ref::<ResolveError>() {
            return Some(refused.clone());
        }
        if let Some(refused) = error.downcast_ref::<TargetRefused>() {
            return Some(refused.clone());
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn class(text: &str) -> AddressClass {
        classify(text.parse().unwrap())
    }

    #[test]
    fn addresses_fall_in_the_documented_classes() {
        use AddressClass::{Blocked, Public, Restricted};
        use AllowedNetwork::{LinkLocal, Loopback, Metadata, Private};
        let table = [
            ("8.8.8.8", Public),
            ("93.184.216.34", Public),
            ("172.15.255.255", Public),
            ("172.32.0.1", Public),
            ("100.128.0.1", Public),
            ("127.0.0.1", Restricted(Loopback)),
            ("127.255.0.9", Restricted(Loopback)),
            ("10.1.2.3", Restricted(Private)),
            ("172.16.0.1", Restricted(Private)),
            ("172.31.255.255", Restricted(Private)),
            ("192.168.1.1", Restricted(Private)),
            ("100.64.0.1", Restricted(Private)),
            ("169.254.1.1", Restricted(LinkLocal)),
            ("169.254.169.254", Restricted(Metadata)),
            ("169.254.170.2", Restricted(Metadata)),
            ("100.100.100.200", Restricted(Metadata)),
            ("0.0.0.0", Blocked),
            ("0.1.2.3", Blocked),
            ("224.0.0.1", Blocked),
            ("255.255.255.255", Blocked),
            ("240.0.0.1", Blocked),
            ("192.0.2.10", Blocked),
            ("198.18.0.1", Blocked),
            ("2606:4700:4700::1111", Public),
            ("::1", Restricted(Loopback)),
            ("::", Blocked),
            ("fe80::1", Restricted(LinkLocal)),
            ("febf::1", Restricted(LinkLocal)),
            ("fc00::1", Restricted(Private)),
            ("fd12:3456::1", Restricted(Private)),
            ("fec0::1", Restricted(Private)),
            ("fd00:ec2::254", Restricted(Metadata)),
            ("ff02::1", Blocked),
            ("2001:db8::1", Blocked),
            ("2001:0:4136:e378::1", Blocked),
            ("::ffff:127.0.0.1", Restricted(Loopback)),
            ("::ffff:169.254.169.254", Restricted(Metadata)),
            ("::ffff:8.8.8.8", Public),
            ("64:ff9b::a00:1", Restricted(Private)),
            ("2002:a9fe:a9fe::1", Restricted(Metadata)),
            ("2002:808:808::1", Public),
            ("::127.0.0.1", Blocked),
        ];
        for (address, expected) in table {
            assert_eq!(class(address), expected, "{address}");
        }
    }

    #[test]
    fn allowances_open_only_their_class() {
        let default = NetworkPolicy::default();
        let loopback = NetworkPolicy::allowing([AllowedNetwork::Loopback]);
        let wide = NetworkPolicy::allowing([AllowedNetwork::Private, AllowedNetwork::LinkLocal]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(default.permits(ip("8.8.8.8")));
        assert!(!default.permits(ip("127.0.0.1")));
        assert!(loopback.permits(ip("127.0.0.1")));
        assert!(loopback.permits(ip("::1")));
        assert!(!loopback.permits(ip("10.0.0.1")));
        assert!(wide.permits(ip("10.0.0.1")));
        assert!(wide.permits(ip("169.254.3.4")));
        // Metadata stays shut unless named; blocked ranges always.
        assert!(!wide.permits(ip("169.254.169.254")));
        assert!(!wide.permits(ip("fd00:ec2::254")));
        let everything = NetworkPolicy::allowing([
            AllowedNetwork::Loopback,
            AllowedNetwork::Private,
            AllowedNetwork::LinkLocal,
            AllowedNetwork::Metadata,
        ]);
        assert!(everything.permits(ip("169.254.169.254")));
        assert!(!everything.permits(ip("0.0.0.0")));
        assert!(!everything.permits(ip("255.255.255.255")));
    }

    #[test]
    fn urls_need_http_or_https_and_a_permitted_literal() {
        let policy = NetworkPolicy::default();
        let check = |url: &str| policy.check_url(&Url::parse(url).unwrap());
        assert_eq!(check("https://hooks.example.com/x"), Ok(()));
        assert_eq!(check("http://93.184.216.34:8080/x"), Ok(()));
        assert_eq!(
            check("ftp://hooks.example.com/x"),
            Err(TargetRefused::Scheme {
                scheme: "ftp".to_owned()
            })
        );
        assert!(matches!(
            check("file:///etc/passwd"),
            Err(TargetRefused::Scheme { .. })
        ));
        assert!(matches!(
            check("gopher://127.0.0.1:6379/_INFO"),
            Err(TargetRefused::Scheme { .. })
        ));
        for refused in [
            "http://127.0.0.1:8080/hook",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/hook",
            "http://[fe80::1]/hook",
            "http://[::ffff:10.0.0.1]/hook",
            "http://0.0.0.0/hook",
            // Integer and hex spellings are normalised by the URL parser.
            "http://2130706433/hook",
            "http://0x7f.1/hook",
        ] {
            assert!(
                matches!(check(refused), Err(TargetRefused::Address { .. })),
                "{refused}"
            );
        }
    }

    #[tokio::test]
    async fn resolution_refuses_names_of_refused_addresses() {
        let policy = NetworkPolicy::default();
        match policy.resolve("localhost").await {
            Err(ResolveError::Refused(TargetRefused::Address { class, .. })) => {
                assert_eq!(class, AddressClass::Restricted(AllowedNetwork::Loopback));
            }
            other => panic!("localhost was not refused: {other:?}"),
        }
        let allowed = NetworkPolicy::allowing([AllowedNetwork::Loopback]);
        let found = allowed.resolve("localhost").await.unwrap();
        assert!(found.iter().all(|a| a.ip().is_loopback()));
    }

    #[tokio::test]
    async fn the_http_client_never_connects_to_a_refused_name() {
        // Nothing listens on port 9 here: a refused lookup must fail before any connection,
        // and the refusal must be recognisable in reqwest's error.
        let client = reqwest::Client::builder()
            .dns_resolver(PolicyResolver::new(NetworkPolicy::default()))
            .no_proxy()
            .build()
            .unwrap();
        let error = client
            .post("http://localhost:9/hook")
            .send()
            .await
            .unwrap_err();
        let refused = refusal_in(&error).expect("a refusal in the error chain");
        assert!(
            matches!(refused, TargetRefused::Address { .. }),
            "{refused}"
        );
    }
}
