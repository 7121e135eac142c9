//! The egress policy where connections are made: the HTTP client that tenants' tools and
//! models go through.
//!
//! Its resolver looks a host name up and hands on only the addresses the policy allows, so the
//! address checked is the address connected to (a name that resolves to a public address when
//! checked and to 127.0.0.1 when connected, DNS rebinding, cannot slip between the two). An
//! address written in the URL reaches no resolver: [`Egress::check_url`] judges it before the
//! request is sent, and the redirect policy judges every redirect's the same way. The client
//! ignores the environment's proxy settings, since a proxy would resolve names out of sight.

use rein_core::egress::{EgressPolicy, EgressRefusal};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Redirects followed before a call fails, as reqwest's default.
const MAX_REDIRECTS: usize = 10;

/// An HTTP client that connects only where the egress policy allows.
#[derive(Clone, Debug)]
pub struct Egress {
    client: reqwest::Client,
    policy: Arc<EgressPolicy>,
}

impl Egress {
    /// A client for tenants' calls under `policy`, connecting within `connect_timeout`.
    pub fn new(policy: EgressPolicy, connect_timeout: Duration) -> Result<Self, reqwest::Error> {
        let policy = Arc::new(policy);
        let for_redirects = policy.clone();
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .user_agent(concat!("rein/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .dns_resolver(Guarded {
                policy: policy.clone(),
            })
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error("too many redirects");
                }
                let host = attempt.url().host_str().unwrap_or_default().to_string();
                match for_redirects.check_literal(&host) {
                    Ok(()) => attempt.follow(),
                    Err(refusal) => attempt.error(refusal),
                }
            }))
            .build()?;
        Ok(Egress { client, policy })
    }

    /// The strictest policy: no internal address is open.
    pub fn closed(connect_timeout: Duration) -> Result<Self, reqwest::Error> {
        Egress::new(EgressPolicy::default(), connect_timeout)
    }

    /// The client to send tenants' requests with.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Checks a URL's host before a request is sent: an address written out is judged here
    /// (a name is judged by the client's resolver when it connects).
    pub fn check_url(&self, url: &str) -> Result<(), EgressRefusal> {
        // A URL that does not parse is refused by the client itself; an empty host is checked
        // as one that is no address.
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        self.policy.check_literal(&host)
    }
}

/// Resolves names with the system resolver and keeps only the addresses the policy allows; a
/// name left with none fails with the refusal of its first address.
struct Guarded {
    policy: Arc<EgressPolicy>,
}

impl Resolve for Guarded {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check(&host, a.ip()) {
                    Ok(()) => true,
                    Err(r) => {
                        refused.get_or_insert(r);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refused) {
                (true, Some(refusal)) => Err(Box::new(refusal) as Box<dyn StdError + Send + Sync>),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}
