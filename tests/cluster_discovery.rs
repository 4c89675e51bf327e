//! DNS discovery with real processes: the test serves A and SRV records from its own DNS server
//! on loopback (hickory-server), and nodes started with no seeds at all find each other through
//! those records, as in a Kubernetes headless service.

mod common;
use common::{TestNode, wait_until};
use hickory_server::Server;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::rdata::{A, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Serves zone `test.local.`: `nodes` A records for every node, and SRV records
/// `_gossip._udp` → `node<i>:<port>`. Runs on its own thread until the test process ends.
fn start_dns(nodes: Vec<(Ipv4Addr, u16)>) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let origin = Name::from_str("test.local.").unwrap();
            let mut zone =
                InMemoryZoneHandler::<TokioRuntimeProvider>::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
            let soa = SOA::new(
                Name::from_str("ns.test.local.").unwrap(),
                Name::from_str("admin.test.local.").unwrap(),
                1,
                3600,
                600,
                86400,
                60,
            );
            let mut records = vec![Record::from_rdata(origin.clone(), 3600, RData::SOA(soa))];
            let all = Name::from_str("nodes.test.local.").unwrap();
            let srv = Name::from_str("_gossip._udp.test.local.").unwrap();
            for (i, &(ip, port)) in nodes.iter().enumerate() {
                let target = Name::from_str(&format!("node{i}.test.local.")).unwrap();
                records.push(Record::from_rdata(all.clone(), 60, RData::A(A(ip))));
                records.push(Record::from_rdata(target.clone(), 60, RData::A(A(ip))));
                records.push(Record::from_rdata(srv.clone(), 60, RData::SRV(SRV::new(0, 0, port, target))));
            }
            for r in records {
                // A repeated record (several nodes on 127.0.0.1) is a no-op that returns false.
                zone.upsert_mut(r, 1);
            }
            let mut catalog = Catalog::new();
            let handler: Arc<dyn ZoneHandler> = Arc::new(zone);
            catalog.upsert(LowerName::from(origin), vec![handler]);
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            tx.send(udp.local_addr().unwrap()).unwrap();
            let mut server = Server::new(catalog);
            server.register_socket(udp);
            let _ = server.block_until_done().await;
        });
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

/// A free UDP port on every one of `ips` (the OS picks it on the first).
fn free_udp_port(ips: &[Ipv4Addr]) -> u16 {
    for _ in 0..50 {
        let port = std::net::UdpSocket::bind((ips[0], 0)).unwrap().local_addr().unwrap().port();
        if ips.iter().all(|ip| std::net::UdpSocket::bind((*ip, port)).is_ok()) {
            return port;
        }
    }
    panic!("no common free UDP port");
}

fn all_see(nodes: &[TestNode], ids: &[&str]) {
    for n in nodes {
        wait_until(Duration::from_secs(30), "every node to find the others through DNS", || {
            let members = n.members();
            let got: Vec<(&str, &str)> = members.iter().map(|m| (m.0.as_str(), m.1.as_str())).collect();
            let want: Vec<(&str, &str)> = ids.iter().map(|id| (*id, "alive")).collect();
            (got == want).then_some(())
        });
    }
}

#[test]
fn dns_srv_discovery_forms_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let lo = Ipv4Addr::LOCALHOST;
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port(&[lo])).collect();
    let dns = start_dns(ports.iter().map(|p| (lo, *p)).collect());
    let nodes: Vec<TestNode> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let sets = [
                format!("shoal.node.id=s{i}"),
                format!("shoal.gossip.port={port}"),
                "shoal.cluster.discovery.mode=dns-srv".to_string(),
                "shoal.cluster.discovery.service=\"_gossip._udp.test.local.\"".to_string(),
                format!("shoal.cluster.discovery.dns-server=\"{dns}\""),
            ];
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            TestNode::start(&dir.path().join(format!("s{i}")), &sets)
        })
        .collect();
    all_see(&nodes, &["s0", "s1", "s2"]);
}

#[test]
fn dns_a_discovery_forms_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let ips: Vec<Ipv4Addr> = (2..5).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    if std::net::UdpSocket::bind((ips[0], 0)).is_err() {
        println!("SKIP: this machine cannot bind 127.0.0.2 (loopback is not a /8 here)");
        return;
    }
    // A records carry no port: every node gossips on the same port, each on its own address.
    let port = free_udp_port(&ips);
    let dns = start_dns(ips.iter().map(|ip| (*ip, port)).collect());
    let nodes: Vec<TestNode> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let sets = [
                format!("shoal.node.id=a{i}"),
                format!("shoal.gossip.host=\"{ip}\""),
                format!("shoal.gossip.port={port}"),
                "shoal.cluster.discovery.mode=dns".to_string(),
                "shoal.cluster.discovery.name=\"nodes.test.local.\"".to_string(),
                format!("shoal.cluster.discovery.dns-server=\"{dns}\""),
            ];
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            TestNode::start(&dir.path().join(format!("a{i}")), &sets)
        })
        .collect();
    all_see(&nodes, &["a0", "a1", "a2"]);
}
