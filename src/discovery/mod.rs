//! Discovery: finds peers to gossip with beyond the static seed list. `dns` looks up the A/AAAA
//! records of a name (a Kubernetes headless service) and gossips to each address on our own
//! gossip port; `dns-srv` looks up SRV records, which carry each peer's host and port. The
//! lookups repeat, so nodes that appear later are found with no config change anywhere.
//! `etcd` registers this node under a key prefix in etcd and reads its peers there
//! ([`etcd`]).

pub mod etcd;

use crate::config::DiscoveryMode;
use crate::membership::Membership;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Lookups repeat this often while the node knows no peer…
const SEARCH_INTERVAL: Duration = Duration::from_secs(1);
/// …and this often once it does (new members still get found).
const REFRESH_INTERVAL: Duration = Duration::from_secs(15);
/// Most peers one lookup may yield, bounding the gossip it triggers.
const PEERS_MAX: usize = 256;

#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    pub mode: DiscoveryMode,
    /// The A/AAAA name (`dns`) or the SRV name (`dns-srv`).
    pub name: String,
    /// The DNS server to ask; the system's when `None`.
    pub dns_server: Option<SocketAddr>,
    /// Port to gossip to for `dns` mode (A records carry no port): our own gossip port.
    pub gossip_port: u16,
    /// For `etcd` mode: where and how to register.
    pub etcd: Option<etcd::EtcdConfig>,
    /// For `etcd` mode: this node's key is `<prefix>/<cluster id>/<node id>`.
    pub cluster_id: String,
    pub node_id: String,
}

fn resolver(dns_server: Option<SocketAddr>) -> anyhow::Result<TokioResolver> {
    Ok(match dns_server {
        None => TokioResolver::builder_tokio()?.build()?,
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let server = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            let mut opts = ResolverOpts::default();
            opts.use_hosts_file = ResolveHosts::Never;
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![server]),
                TokioRuntimeProvider::default(),
            )
            .with_options(opts)
            .build()?
        }
    })
}

/// The gossip addresses the records name right now.
pub async fn lookup(cfg: &DiscoveryConfig) -> anyhow::Result<Vec<SocketAddr>> {
    let resolver = resolver(cfg.dns_server)?;
    let mut out = Vec::new();
    match cfg.mode {
        // etcd is read through a registration (see `spawn`), not looked up.
        DiscoveryMode::Static | DiscoveryMode::Etcd => {}
        DiscoveryMode::Dns => {
            let ips = resolver.lookup_ip(cfg.name.as_str()).await?;
            out.extend(ips.iter().map(|ip| SocketAddr::new(ip, cfg.gossip_port)));
        }
        DiscoveryMode::DnsSrv => {
            let lookup = resolver.srv_lookup(cfg.name.as_str()).await?;
            let targets: Vec<_> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(s) => Some(s.clone()),
                    _ => None,
                })
                .take(PEERS_MAX)
                .collect();
            for srv in targets {
                // The server usually sends the targets' addresses along (glue); ask otherwise.
                let glue: Vec<IpAddr> = lookup
                    .additionals()
                    .iter()
                    .filter(|r| r.name == srv.target)
                    .filter_map(|r| r.data.ip_addr())
                    .collect();
                let ips: Vec<IpAddr> =
                    if glue.is_empty() { resolver.lookup_ip(srv.target.clone()).await?.iter().collect() } else { glue };
                out.extend(ips.into_iter().map(|ip| SocketAddr::new(ip, srv.port)));
            }
        }
    }
    out.sort();
    out.dedup();
    out.truncate(PEERS_MAX);
    Ok(out)
}

/// Looks peers up again and again and gossips to each one found; ends with the membership.
pub fn spawn(membership: &Arc<Membership>, cfg: DiscoveryConfig) {
    if cfg.mode == DiscoveryMode::Static {
        return;
    }
    if cfg.mode == DiscoveryMode::Etcd {
        return spawn_etcd(membership, cfg);
    }
    let weak = Arc::downgrade(membership);
    tokio::spawn(async move {
        loop {
            let Some(membership) = weak.upgrade() else { return };
            let own = membership.config().advertise_addr;
            match lookup(&cfg).await {
                Ok(peers) => {
                    for peer in peers.into_iter().filter(|p| *p != own) {
                        membership.gossip_to(peer);
                    }
                }
                Err(e) => tracing::warn!(name = %cfg.name, error = %e, "peer discovery lookup failed"),
            }
            let alone = membership.members().await.len() <= 1;
            drop(membership);
            tokio::time::sleep(if alone { SEARCH_INTERVAL } else { REFRESH_INTERVAL }).await;
        }
    });
}

/// Registers this node in etcd and keeps its lease alive, gossiping to every peer registered
/// there; ends with the membership (the key then goes when its lease runs out).
fn spawn_etcd(membership: &Arc<Membership>, cfg: DiscoveryConfig) {
    let own = membership.config().advertise_addr;
    let Some(etcd_cfg) = cfg.etcd.clone() else {
        tracing::error!("etcd discovery without shoal.cluster.discovery.etcd settings");
        return;
    };
    let mut registration = match etcd::Registration::new(etcd_cfg, &cfg.cluster_id, &cfg.node_id, own) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up etcd discovery");
            return;
        }
    };
    let weak = Arc::downgrade(membership);
    tokio::spawn(async move {
        loop {
            let Some(membership) = weak.upgrade() else { return };
            match registration.refresh().await {
                Ok(peers) => {
                    for peer in peers.into_iter().filter(|p| *p != own).take(PEERS_MAX) {
                        membership.gossip_to(peer);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "etcd discovery: cannot register or read peers"),
            }
            drop(membership);
            tokio::time::sleep(registration.refresh_interval()).await;
        }
    });
}
