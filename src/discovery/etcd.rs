//! etcd discovery (rqlite's etcd-kv mode): each node keeps its gossip address under
//! `<prefix>/<cluster id>/<node id>`, attached to a lease it renews, and reads the others
//! there. A node that stops renewing (crashed, stopped, left) drops out once its lease ends.
//! Speaks etcd v3's JSON gateway (`/v3/...`, keys and values base64), which every etcd since
//! 3.3 serves on its client URLs, so no gRPC stack is needed.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;

/// Most keys one read returns (bounds the answer, as DNS discovery's peer bound does).
const KEYS_MAX: usize = 256;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs such as `http://10.0.0.5:2379`; tried in order until one answers.
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/shoal`.
    pub prefix: String,
    pub lease_ttl: Duration,
}

/// This node's registration: the lease that keeps its key alive.
pub struct Registration {
    cfg: EtcdConfig,
    http: reqwest::Client,
    /// `<prefix>/<cluster id>/`.
    dir: String,
    key: String,
    value: String,
    lease: Option<String>,
}

impl Registration {
    pub fn new(cfg: EtcdConfig, cluster_id: &str, node_id: &str, gossip_addr: SocketAddr) -> anyhow::Result<Self> {
        crate::tls::install_default_provider();
        let http = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build()?;
        let dir = format!("{}/{cluster_id}/", cfg.prefix.trim_end_matches('/'));
        Ok(Self { key: format!("{dir}{node_id}"), dir, value: gossip_addr.to_string(), cfg, http, lease: None })
    }

    /// How often [`Registration::refresh`] must run to keep the key: well inside the lease.
    pub fn refresh_interval(&self) -> Duration {
        (self.cfg.lease_ttl / 3).max(Duration::from_millis(500))
    }

    /// Renews the lease (or, when it ended or none exists yet, takes a new one and writes the
    /// key again), then returns the gossip addresses registered under the cluster's prefix.
    pub async fn refresh(&mut self) -> anyhow::Result<Vec<SocketAddr>> {
        let alive = match &self.lease {
            Some(id) => {
                let answer = self.call("/v3/lease/keepalive", json!({ "ID": id })).await?;
                ttl(&answer["result"]["TTL"]) > 0
            }
            None => false,
        };
        if !alive {
            let ttl_secs = self.cfg.lease_ttl.as_secs().max(1);
            let grant = self.call("/v3/lease/grant", json!({ "TTL": ttl_secs })).await?;
            let id = grant["ID"]
                .as_str()
                .map(String::from)
                .ok_or_else(|| anyhow::anyhow!("etcd granted no lease: {grant}"))?;
            self.call(
                "/v3/kv/put",
                json!({ "key": B64.encode(&self.key), "value": B64.encode(&self.value), "lease": id }),
            )
            .await?;
            tracing::info!(key = %self.key, lease = %id, "registered in etcd");
            self.lease = Some(id);
        }
        self.peers().await
    }

    /// Every address registered under this cluster's prefix (this node's own included).
    pub async fn peers(&self) -> anyhow::Result<Vec<SocketAddr>> {
        let answer = self
            .call(
                "/v3/kv/range",
                json!({ "key": B64.encode(&self.dir), "range_end": B64.encode(prefix_end(&self.dir)), "limit": KEYS_MAX }),
            )
            .await?;
        let mut out = Vec::new();
        for kv in answer["kvs"].as_array().into_iter().flatten() {
            let value = kv["value"].as_str().and_then(|v| B64.decode(v).ok()).unwrap_or_default();
            match String::from_utf8_lossy(&value).parse::<SocketAddr>() {
                Ok(addr) => out.push(addr),
                Err(_) => tracing::warn!(key = %kv["key"], "an etcd discovery entry is not host:port; skipped"),
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Ends the lease, so the key goes at once (a leave); best effort.
    pub async fn revoke(&mut self) {
        if let Some(id) = self.lease.take()
            && let Err(e) = self.call("/v3/lease/revoke", json!({ "ID": id })).await
        {
            tracing::warn!(error = %e, "could not revoke the etcd lease; the key goes when it expires");
        }
    }

    /// POSTs `body` to `path` on the first endpoint that answers.
    async fn call(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let mut last = None;
        for endpoint in &self.cfg.endpoints {
            let url = format!("{}{path}", endpoint.trim_end_matches('/'));
            match self.http.post(&url).json(&body).send().await {
                Ok(resp) if resp.status().is_success() => return Ok(resp.json().await?),
                Ok(resp) => {
                    let status = resp.status();
                    last = Some(anyhow::anyhow!("{url} answered {status}: {}", resp.text().await.unwrap_or_default()));
                }
                Err(e) => last = Some(anyhow::anyhow!("{url}: {e}")),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no etcd endpoint configured")))
    }
}

/// etcd gives int64s as JSON strings; an absent TTL is 0 (the lease is gone).
fn ttl(v: &Value) -> i64 {
    v.as_str().and_then(|s| s.parse().ok()).or_else(|| v.as_i64()).unwrap_or(0)
}

/// The end of the key range of everything that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(super::prefix_end("/shoal/c/"), b"/shoal/c0".to_vec());
        assert_eq!(super::ttl(&serde_json::json!("10")), 10);
        assert_eq!(super::ttl(&serde_json::Value::Null), 0);
    }
}
