//! Node configuration: HOCON through `hocon-parser` (library name `hocon`).
//!
//! Layers, later wins: the embedded `reference.conf`, the file given with `--config`, one
//! environment variable per key (`shoal.http.port` → `SHOAL_HTTP_PORT`), then `--set key=value`.
//! All layers are concatenated into one HOCON text, because HOCON already says "later keys win".
//! Environment values are read like `--set` values (HOCON, else a string) rather than through
//! `${?VAR}`, so that a list such as `SHOAL_CLUSTER_SEEDS='["a:7280"]'` works too.
//! Every value is read once here into [`Config`]; a bad value names its key and the expected form.

use std::path::PathBuf;
use std::time::Duration;

const REFERENCE: &str = include_str!("reference.conf");

/// Largest `shoal.http.max-body`: the records of one body stay well inside
/// [`crate::storage::wal::RECORD_BYTES_MAX`].
pub const HTTP_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Every key a user may set, with what its value must look like. Unknown `shoal.*` keys are
/// rejected so that a typo does not silently fall back to a default.
const KEYS: &[(&str, &str)] = &[
    ("shoal.node.id", "a name of letters, digits, '-', '_' or '.'"),
    ("shoal.data-dir", "a path"),
    ("shoal.log-level", "one of trace, debug, info, warn, error"),
    ("shoal.http.host", "a host name or IP address"),
    ("shoal.http.port", "an integer port 0..65535"),
    ("shoal.http.max-body", "a byte size from 1 byte to 64MiB, such as 16MiB"),
    ("shoal.http.max-connections", "an integer >= 1"),
    ("shoal.http.header-read-timeout", "a duration of at least 100ms, such as 10s"),
    ("shoal.http.request-timeout", "a duration of at least 100ms, such as 60s"),
    ("shoal.http.tls.cert-file", "the path of a PEM certificate chain (with key-file)"),
    ("shoal.http.tls.key-file", "the path of a PEM private key (with cert-file)"),
    ("shoal.http.tls.ca-file", "the path of a PEM file of CA certificates"),
    ("shoal.gossip.host", "a host name or IP address"),
    ("shoal.gossip.port", "an integer port 0..65535"),
    ("shoal.gossip.advertise", "host:port"),
    ("shoal.gossip.interval", "a duration such as 100ms"),
    ("shoal.gossip.phi-threshold", "a number >= 1"),
    ("shoal.gossip.dead-node-grace", "a duration such as 1h"),
    ("shoal.cluster.id", "a non-empty name"),
    ("shoal.cluster.seeds", "a list of \"host:port\" strings"),
    ("shoal.cluster.discovery.mode", "one of static, dns, dns-srv, etcd"),
    ("shoal.cluster.discovery.name", "a DNS name"),
    ("shoal.cluster.discovery.service", "a DNS SRV name"),
    ("shoal.cluster.discovery.dns-server", "host:port of a DNS server"),
    ("shoal.cluster.discovery.etcd.endpoints", "a list of etcd client URLs such as [\"http://10.0.0.5:2379\"]"),
    ("shoal.cluster.discovery.etcd.prefix", "an etcd key prefix such as /shoal"),
    ("shoal.cluster.discovery.etcd.lease-ttl", "a duration of at least 2s, such as 10s"),
    ("shoal.cluster.bootstrap-expect", "an integer >= 1"),
    ("shoal.cluster.required-contact-point-nr", "an integer >= 1"),
    ("shoal.cluster.replication-factor", "an integer >= 1"),
    ("shoal.cluster.metrics-selector", "one of heap, load, cpu, disk, mix"),
    ("shoal.cluster.roles", "a non-empty list of \"storage\" and/or \"query\""),
    ("shoal.cluster.replica-replace-after", "a duration such as 10m"),
    ("shoal.cluster.capacity-interval", "a duration of at least 100ms, such as 5s"),
    ("shoal.cluster.leave-timeout", "a duration such as 2m"),
    ("shoal.cluster.secret", "a secret of at least 16 characters (shoal keygen makes one)"),
    ("shoal.cluster.secret-file", "the path of a file holding the cluster secret"),
    ("shoal.auth.file", "the path of a users file (docs/security.md)"),
    ("shoal.sharding.interval", "a duration of at least 1s, such as 1d"),
    ("shoal.retention", "a duration such as 30d (0s: keep everything)"),
    ("shoal.write.consistency", "one of one, quorum, all"),
    ("shoal.storage.compaction-priority", "one of idle, low, normal"),
    ("shoal.write.max-batch-points", "an integer >= 1"),
    ("shoal.write.default-namespace", "a name of letters, digits and '_', starting with a letter"),
    ("shoal.write.strict-fields", "true or false"),
    ("shoal.storage.memtable-max-points", "an integer >= 1"),
    ("shoal.storage.memtable-budget-points", "an integer >= 1"),
    ("shoal.storage.flush-interval", "a duration such as 30s"),
    ("shoal.storage.segments-max", "an integer >= 1"),
    ("shoal.query.max-records", "an integer >= 1"),
    ("shoal.query.cache-size", "a size in bytes (0: no answers kept), like 64MiB"),
    ("shoal.hints.max-bytes-per-node", "a byte size such as 1GiB"),
    ("shoal.hints.max-age", "a duration such as 3h"),
    ("shoal.hints.replay-interval", "a duration of at least 10ms, such as 1s"),
    ("shoal.repair.interval", "a duration of at least 100ms, such as 5m"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    One,
    Quorum,
    All,
}

impl Consistency {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "one" => Some(Self::One),
            "quorum" => Some(Self::Quorum),
            "all" => Some(Self::All),
            _ => None,
        }
    }
    /// Acknowledgements needed out of `replicas`.
    pub fn required(self, replicas: usize) -> usize {
        match self {
            // At least one: a shard with no replicas cannot meet any level.
            Self::One => 1,
            Self::Quorum => replicas / 2 + 1,
            Self::All => replicas.max(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryMode {
    Static,
    Dns,
    DnsSrv,
    Etcd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    Heap,
    Load,
    Cpu,
    Disk,
    Mix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Storage,
    Query,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub log_level: String,
    pub http_host: String,
    pub http_port: u16,
    pub http_body_bytes_max: usize,
    pub http_connections_max: usize,
    pub http_header_read_timeout: Duration,
    pub http_request_timeout: Duration,
    /// TLS on the HTTP port: both or neither.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// CAs the peer client trusts (the system's when unset).
    pub tls_ca_file: Option<PathBuf>,
    pub gossip_host: String,
    pub gossip_port: u16,
    pub gossip_advertise: Option<String>,
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
    pub dead_node_grace: Duration,
    pub cluster_id: String,
    pub seeds: Vec<String>,
    pub discovery_mode: DiscoveryMode,
    pub discovery_name: Option<String>,
    pub discovery_service: Option<String>,
    pub discovery_dns_server: Option<String>,
    pub discovery_etcd: crate::discovery::etcd::EtcdConfig,
    /// The cluster secret (from `shoal.cluster.secret` or the file `secret-file` names);
    /// `None`: gossip and the internal API are not authenticated.
    pub cluster_secret: Option<String>,
    /// The users file (`shoal.auth.file`); `None`: the public API asks for no credentials.
    pub auth_file: Option<PathBuf>,
    pub bootstrap_expect: usize,
    pub required_contact_point_nr: usize,
    pub replication_factor: usize,
    pub metrics_selector: Selector,
    pub roles: Vec<Role>,
    pub replica_replace_after: Duration,
    pub capacity_interval: Duration,
    /// How long a graceful leave keeps retrying shards no other node could take yet.
    pub leave_timeout: Duration,
    pub shard_interval_ms: i64,
    /// Points older than this are refused and shards past it dropped; `None`: kept for ever.
    pub retention: Option<Duration>,
    pub write_consistency: Consistency,
    pub write_batch_points_max: usize,
    /// The namespace of an Influx request that names no retention policy.
    pub default_namespace: String,
    /// Refuse line protocol batches with string fields instead of skipping those fields.
    pub strict_fields: bool,
    pub memtable_points_max: usize,
    /// Points held in the memtables of all shards together (`memtable-budget-points`).
    pub memtable_budget_points: usize,
    pub flush_interval: Duration,
    pub segments_max: usize,
    pub compaction_priority: crate::env::BackgroundPriority,
    pub query_records_max: usize,
    /// Bytes of answers kept for repeated selects (`shoal.query.cache-size`); 0: none.
    pub query_cache_bytes: usize,
    pub hints_bytes_max_per_node: u64,
    pub hints_age_max: Duration,
    pub hints_replay_interval: Duration,
    pub repair_interval: Duration,
    /// Not a config key: `shoal start --salvage-wal`, a one-off repair of a corrupt WAL.
    pub wal_salvage: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config is not valid HOCON: {0}")]
    Syntax(String),
    #[error("config key {key}: expected {expected}, got {got}")]
    Value { key: String, expected: String, got: String },
    #[error("unknown config key {key} (a typo?); docs/configuration.md lists the keys")]
    Unknown { key: String },
    #[error("--set expects key=value, got {0:?}")]
    SetSyntax(String),
}

/// Maps a key path to its environment variable: `shoal.http.port` → `SHOAL_HTTP_PORT`.
pub fn env_var_for(key: &str) -> String {
    key.to_uppercase().replace(['.', '-'], "_")
}

/// Environment variables that look like Shoal's (`SHOAL_…`) but name no config key: a typo
/// there would otherwise be ignored without a word.
pub fn unknown_env_vars<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let known: std::collections::HashSet<String> = KEYS.iter().map(|(key, _)| env_var_for(key)).collect();
    // Variables of the CLI and of the tests, not config keys.
    const OTHERS: &[&str] = &[
        "SHOAL_NODE",
        "SHOAL_USER",
        "SHOAL_PASSWORD",
        "SHOAL_CA_FILE",
        "SHOAL_SIM_SEED",
        "SHOAL_FUZZ_SEED",
        "SHOAL_FUZZ_SECONDS",
    ];
    names
        .into_iter()
        .filter(|n| n.starts_with("SHOAL_") && !known.contains(*n) && !OTHERS.contains(n))
        .map(String::from)
        .collect()
}

impl Config {
    /// Builds the config from the embedded defaults, an optional file, the process environment
    /// and `--set` overrides.
    pub fn load(file: Option<&std::path::Path>, sets: &[String]) -> Result<Self, ConfigError> {
        let file_text = match file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?,
            None => String::new(),
        };
        let env: std::collections::HashMap<String, String> = std::env::vars().collect();
        Self::from_layers(&file_text, &env, sets)
    }

    /// The pure part of [`Config::load`]: tests and the simulator call it with their own layers.
    pub fn from_layers(
        file_text: &str,
        env: &std::collections::HashMap<String, String>,
        sets: &[String],
    ) -> Result<Self, ConfigError> {
        // Parse the file alone first so that its syntax errors point at its own lines.
        if !file_text.trim().is_empty() {
            hocon::parse(file_text).map_err(|e| ConfigError::Syntax(format!("in the config file: {e}")))?;
        }
        let mut text = format!("{REFERENCE}\n{file_text}\n");
        let mut overrides: Vec<(String, String)> = Vec::new();
        for (key, _) in KEYS {
            if let Some(value) = env.get(&env_var_for(key)) {
                overrides.push((key.to_string(), value.clone()));
            }
        }
        for set in sets {
            let (key, value) = set.split_once('=').ok_or_else(|| ConfigError::SetSyntax(set.clone()))?;
            if key.trim().is_empty() {
                return Err(ConfigError::SetSyntax(set.clone()));
            }
            overrides.push((key.trim().to_string(), value.trim().to_string()));
        }
        for (key, value) in overrides {
            // A value is HOCON (so lists work); one that is not valid HOCON is taken as a string.
            let as_hocon = format!("{key} = {value}\n");
            if hocon::parse(&as_hocon).is_ok() {
                text.push_str(&as_hocon);
            } else {
                text.push_str(&format!("{key} = {}\n", serde_json::Value::String(value)));
            }
        }
        let parsed = hocon::parse(&text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        reject_unknown_keys(&parsed)?;
        Reader(&parsed).build()
    }
}

fn reject_unknown_keys(cfg: &hocon::Config) -> Result<(), ConfigError> {
    fn walk(prefix: &str, value: &hocon::HoconValue, out: &mut Vec<String>) {
        match value {
            hocon::HoconValue::Object(map) => {
                for (k, v) in map {
                    walk(&format!("{prefix}.{k}"), v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut leaves = Vec::new();
    if let Some(root) = cfg.get("shoal") {
        walk("shoal", root, &mut leaves);
    }
    match leaves.into_iter().find(|leaf| !KEYS.iter().any(|(k, _)| k == leaf)) {
        Some(key) => Err(ConfigError::Unknown { key }),
        None => Ok(()),
    }
}

/// Typed reads that turn every failure into an error naming the key and the expected form.
struct Reader<'a>(&'a hocon::Config);

impl Reader<'_> {
    fn expected(key: &str) -> String {
        KEYS.iter().find(|(k, _)| *k == key).map_or("a valid value", |(_, e)| e).to_string()
    }
    fn raw(&self, key: &str) -> String {
        match self.0.get(key) {
            Some(hocon::HoconValue::Scalar(s)) => format!("{:?}", s.raw),
            Some(hocon::HoconValue::Array(_)) => "a list".into(),
            Some(hocon::HoconValue::Object(_)) => "an object".into(),
            Some(_) => "an unresolved value".into(),
            None => "nothing".into(),
        }
    }
    fn err(&self, key: &str) -> ConfigError {
        ConfigError::Value { key: key.into(), expected: Self::expected(key), got: self.raw(key) }
    }
    fn opt_string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(hocon::HoconValue::Scalar(_)) => self.0.get_string(key).map(Some).map_err(|_| self.err(key)),
            Some(_) => Err(self.err(key)),
        }
    }
    fn string(&self, key: &str) -> Result<String, ConfigError> {
        self.opt_string(key)?.filter(|s| !s.is_empty()).ok_or_else(|| self.err(key))
    }
    fn int(&self, key: &str, min: i64, max: i64) -> Result<i64, ConfigError> {
        let v = self.0.get_i64(key).map_err(|_| self.err(key))?;
        if v < min || v > max { Err(self.err(key)) } else { Ok(v) }
    }
    fn count(&self, key: &str) -> Result<usize, ConfigError> {
        Ok(self.int(key, 1, i64::from(u32::MAX))? as usize)
    }
    fn float(&self, key: &str, min: f64) -> Result<f64, ConfigError> {
        let v = self.0.get_f64(key).map_err(|_| self.err(key))?;
        if v.is_finite() && v >= min { Ok(v) } else { Err(self.err(key)) }
    }
    fn duration(&self, key: &str) -> Result<Duration, ConfigError> {
        self.0.get_duration(key).map_err(|_| self.err(key))
    }
    fn duration_min(&self, key: &str, min: Duration) -> Result<Duration, ConfigError> {
        Some(self.duration(key)?).filter(|d| *d >= min).ok_or_else(|| self.err(key))
    }
    fn path(&self, key: &str) -> Result<Option<PathBuf>, ConfigError> {
        Ok(self.opt_string(key)?.filter(|s| !s.is_empty()).map(PathBuf::from))
    }
    fn bytes(&self, key: &str) -> Result<usize, ConfigError> {
        let v = self.0.get_bytes(key).map_err(|_| self.err(key))?;
        if v < 1 { Err(self.err(key)) } else { Ok(v as usize) }
    }
    fn strings(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        let list = self.0.get_list(key).map_err(|_| self.err(key))?;
        list.iter()
            .map(|v| match v {
                hocon::HoconValue::Scalar(s) => Ok(s.raw.clone()),
                _ => Err(self.err(key)),
            })
            .collect()
    }
    fn choice<T: Copy>(&self, key: &str, choices: &[(&str, T)]) -> Result<T, ConfigError> {
        let s = self.string(key)?;
        choices.iter().find(|(name, _)| *name == s).map(|(_, v)| *v).ok_or_else(|| self.err(key))
    }

    fn build(&self) -> Result<Config, ConfigError> {
        let node_id = match self.opt_string("shoal.node.id")? {
            Some(id) => id,
            None => hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "shoal".into()),
        };
        let id_ok = !node_id.is_empty()
            && node_id.len() <= 64
            && node_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !id_ok {
            return Err(ConfigError::Value {
                key: "shoal.node.id".into(),
                expected: "1 to 64 letters, digits, '-', '_' or '.' (set it when the host name is not like that)"
                    .into(),
                got: format!("{node_id:?}"),
            });
        }
        let shard_interval = self.duration("shoal.sharding.interval")?;
        if shard_interval < Duration::from_secs(1) {
            return Err(self.err("shoal.sharding.interval"));
        }
        let roles_raw = self.strings("shoal.cluster.roles")?;
        let mut roles = Vec::new();
        for r in &roles_raw {
            roles.push(match r.as_str() {
                "storage" => Role::Storage,
                "query" => Role::Query,
                _ => return Err(self.err("shoal.cluster.roles")),
            });
        }
        roles.sort();
        roles.dedup();
        if roles.is_empty() {
            return Err(self.err("shoal.cluster.roles"));
        }
        let seeds = self.strings("shoal.cluster.seeds")?;
        if seeds.iter().any(|s| s.rsplit_once(':').is_none_or(|(_, p)| p.parse::<u16>().is_err())) {
            return Err(self.err("shoal.cluster.seeds"));
        }
        let log_level = self.string("shoal.log-level")?;
        if !["trace", "debug", "info", "warn", "error"].contains(&log_level.as_str()) {
            return Err(self.err("shoal.log-level"));
        }
        let discovery_mode = self.choice(
            "shoal.cluster.discovery.mode",
            &[
                ("static", DiscoveryMode::Static),
                ("dns", DiscoveryMode::Dns),
                ("dns-srv", DiscoveryMode::DnsSrv),
                ("etcd", DiscoveryMode::Etcd),
            ],
        )?;
        let discovery_name = self.opt_string("shoal.cluster.discovery.name")?;
        let discovery_service = self.opt_string("shoal.cluster.discovery.service")?;
        if discovery_mode == DiscoveryMode::Dns && discovery_name.is_none() {
            return Err(self.err("shoal.cluster.discovery.name"));
        }
        if discovery_mode == DiscoveryMode::DnsSrv && discovery_service.is_none() {
            return Err(self.err("shoal.cluster.discovery.service"));
        }
        let discovery_etcd = crate::discovery::etcd::EtcdConfig {
            endpoints: self.strings("shoal.cluster.discovery.etcd.endpoints")?,
            prefix: self.string("shoal.cluster.discovery.etcd.prefix")?,
            lease_ttl: self.duration_min("shoal.cluster.discovery.etcd.lease-ttl", Duration::from_secs(2))?,
        };
        if discovery_mode == DiscoveryMode::Etcd
            && (discovery_etcd.endpoints.is_empty()
                || discovery_etcd.endpoints.iter().any(|e| !e.starts_with("http://") && !e.starts_with("https://")))
        {
            return Err(self.err("shoal.cluster.discovery.etcd.endpoints"));
        }
        Ok(Config {
            node_id,
            data_dir: PathBuf::from(self.string("shoal.data-dir")?),
            log_level,
            http_host: self.string("shoal.http.host")?,
            http_port: self.int("shoal.http.port", 0, 65535)? as u16,
            // A body becomes WAL records, which replay reads only up to a bound (a body's points
            // can take about three times its bytes there).
            http_body_bytes_max: match self.bytes("shoal.http.max-body")? {
                n if n > HTTP_BODY_BYTES_MAX => return Err(self.err("shoal.http.max-body")),
                n => n,
            },
            http_connections_max: self.count("shoal.http.max-connections")?,
            http_header_read_timeout: self
                .duration_min("shoal.http.header-read-timeout", Duration::from_millis(100))?,
            http_request_timeout: self.duration_min("shoal.http.request-timeout", Duration::from_millis(100))?,
            tls_cert_file: self.path("shoal.http.tls.cert-file")?,
            tls_key_file: match (self.path("shoal.http.tls.cert-file")?, self.path("shoal.http.tls.key-file")?) {
                (Some(_), Some(key)) => Some(key),
                (None, None) => None,
                (Some(_), None) => return Err(self.err("shoal.http.tls.key-file")),
                (None, Some(_)) => return Err(self.err("shoal.http.tls.cert-file")),
            },
            tls_ca_file: self.path("shoal.http.tls.ca-file")?,
            gossip_host: self.string("shoal.gossip.host")?,
            gossip_port: self.int("shoal.gossip.port", 0, 65535)? as u16,
            gossip_advertise: self.opt_string("shoal.gossip.advertise")?,
            gossip_interval: self.duration("shoal.gossip.interval")?,
            phi_threshold: self.float("shoal.gossip.phi-threshold", 1.0)?,
            dead_node_grace: self.duration("shoal.gossip.dead-node-grace")?,
            cluster_id: self.string("shoal.cluster.id")?,
            seeds,
            discovery_mode,
            discovery_name,
            discovery_service,
            discovery_dns_server: self.opt_string("shoal.cluster.discovery.dns-server")?,
            discovery_etcd,
            cluster_secret: {
                let secret = {
                    let inline = self.opt_string("shoal.cluster.secret")?.filter(|s| !s.is_empty());
                    let file = self.opt_string("shoal.cluster.secret-file")?.filter(|s| !s.is_empty());
                    match (inline, file) {
                        (Some(_), Some(_)) => return Err(self.err("shoal.cluster.secret-file")),
                        (Some(secret), None) => Some(secret),
                        (None, Some(path)) => Some(std::fs::read_to_string(&path).map_err(|e| ConfigError::Value {
                            key: "shoal.cluster.secret-file".into(),
                            expected: "a readable file".into(),
                            got: format!("{path:?} ({e})"),
                        })?),
                        (None, None) => None,
                    }
                }
                .map(|s| s.trim().to_string());
                // A secret too short to be one is an error, never security silently off.
                if secret.as_ref().is_some_and(|s| s.chars().count() < crate::keyring::SECRET_CHARS_MIN) {
                    return Err(ConfigError::Value {
                        key: "shoal.cluster.secret".into(),
                        expected: Self::expected("shoal.cluster.secret"),
                        got: "a shorter secret".into(),
                    });
                }
                secret
            },
            auth_file: self.opt_string("shoal.auth.file")?.filter(|s| !s.is_empty()).map(PathBuf::from),
            bootstrap_expect: self.count("shoal.cluster.bootstrap-expect")?,
            required_contact_point_nr: self.count("shoal.cluster.required-contact-point-nr")?,
            replication_factor: self.count("shoal.cluster.replication-factor")?,
            metrics_selector: self.choice(
                "shoal.cluster.metrics-selector",
                &[
                    ("heap", Selector::Heap),
                    ("load", Selector::Load),
                    ("cpu", Selector::Cpu),
                    ("disk", Selector::Disk),
                    ("mix", Selector::Mix),
                ],
            )?,
            roles,
            replica_replace_after: self.duration("shoal.cluster.replica-replace-after")?,
            capacity_interval: match self.duration("shoal.cluster.capacity-interval")? {
                d if d >= Duration::from_millis(100) => d,
                _ => return Err(self.err("shoal.cluster.capacity-interval")),
            },
            leave_timeout: self.duration("shoal.cluster.leave-timeout")?,
            shard_interval_ms: shard_interval.as_millis().min(i64::MAX as u128) as i64,
            retention: Some(self.duration("shoal.retention")?).filter(|d| !d.is_zero()),
            write_consistency: self.choice(
                "shoal.write.consistency",
                &[("one", Consistency::One), ("quorum", Consistency::Quorum), ("all", Consistency::All)],
            )?,
            write_batch_points_max: self.count("shoal.write.max-batch-points")?,
            default_namespace: {
                let ns = self.string("shoal.write.default-namespace")?;
                crate::model::validate_name("namespace", &ns).map_err(|_| self.err("shoal.write.default-namespace"))?;
                ns
            },
            strict_fields: self.choice("shoal.write.strict-fields", &[("true", true), ("false", false)])?,
            memtable_points_max: self.count("shoal.storage.memtable-max-points")?,
            memtable_budget_points: self.count("shoal.storage.memtable-budget-points")?,
            flush_interval: self.duration("shoal.storage.flush-interval")?,
            segments_max: self.count("shoal.storage.segments-max")?,
            compaction_priority: {
                use crate::env::BackgroundPriority::*;
                self.choice("shoal.storage.compaction-priority", &[("idle", Idle), ("low", Low), ("normal", Normal)])?
            },
            query_records_max: self.count("shoal.query.max-records")?,
            query_cache_bytes: match self.0.get_bytes("shoal.query.cache-size") {
                Ok(v) if v >= 0 => v as usize,
                _ => return Err(self.err("shoal.query.cache-size")),
            },
            hints_bytes_max_per_node: self.bytes("shoal.hints.max-bytes-per-node")? as u64,
            hints_age_max: self.duration("shoal.hints.max-age")?,
            hints_replay_interval: match self.duration("shoal.hints.replay-interval")? {
                d if d >= Duration::from_millis(10) => d,
                _ => return Err(self.err("shoal.hints.replay-interval")),
            },
            repair_interval: match self.duration("shoal.repair.interval")? {
                d if d >= Duration::from_millis(100) => d,
                _ => return Err(self.err("shoal.repair.interval")),
            },
            wal_salvage: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Every level needs at least one acknowledgement, also of a shard with no replicas.
    #[test]
    fn consistency_levels_need_at_least_one_ack() {
        for (replicas, one, quorum, all) in [(0, 1, 1, 1), (1, 1, 1, 1), (2, 1, 2, 2), (3, 1, 2, 3)] {
            assert_eq!(Consistency::One.required(replicas), one);
            assert_eq!(Consistency::Quorum.required(replicas), quorum);
            assert_eq!(Consistency::All.required(replicas), all);
        }
    }

    fn load(file: &str, env: &[(&str, &str)], sets: &[&str]) -> Result<Config, ConfigError> {
        let env: HashMap<_, _> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_layers(file, &env, &sets)
    }

    #[test]
    fn defaults_are_a_single_node() {
        let c = load("", &[], &["shoal.node.id=n1"]).unwrap();
        assert_eq!(c.http_port, 9000);
        assert_eq!(c.shard_interval_ms, 86_400_000);
        assert_eq!(c.write_consistency, Consistency::Quorum);
        assert_eq!(c.roles, vec![Role::Storage, Role::Query]);
        assert_eq!(c.gossip_interval, Duration::from_millis(100));
    }

    #[test]
    fn layers_apply_in_order_file_env_set() {
        let file = "shoal.http.port = 9100\nshoal.gossip.port = 7300\nshoal.sharding.interval = 1h";
        let c = load(file, &[("SHOAL_GOSSIP_PORT", "7400"), ("SHOAL_NODE_ID", "envnode")], &[]).unwrap();
        assert_eq!((c.http_port, c.gossip_port, c.node_id.as_str()), (9100, 7400, "envnode"));
        assert_eq!(c.shard_interval_ms, 3_600_000);
        let c = load(file, &[("SHOAL_GOSSIP_PORT", "7400")], &["shoal.gossip.port=7500", "shoal.node.id=x"]).unwrap();
        assert_eq!(c.gossip_port, 7500);
        let c =
            load("", &[], &["shoal.cluster.seeds=[\"127.0.0.1:7281\", \"b:1\"]", "shoal.data-dir=/tmp/x y"]).unwrap();
        assert_eq!(c.seeds, vec!["127.0.0.1:7281", "b:1"]);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x y"));
    }

    #[test]
    fn bad_values_name_the_key_and_form() {
        let cases: &[(&str, &[&str], &str)] = &[
            ("shoal.http.port = 70000", &[], "shoal.http.port"),
            ("shoal.http.port = abc", &[], "shoal.http.port"),
            ("", &["shoal.write.consistency=most"], "shoal.write.consistency"),
            ("", &["shoal.storage.compaction-priority=lowest"], "shoal.storage.compaction-priority"),
            ("", &["shoal.sharding.interval=10ms"], "shoal.sharding.interval"),
            ("", &["shoal.http.max-body=1GiB"], "from 1 byte to 64MiB"),
            ("", &["shoal.cluster.roles=[\"compute\"]"], "shoal.cluster.roles"),
            ("", &["shoal.cluster.seeds=[\"nohostport\"]"], "shoal.cluster.seeds"),
            ("shoal.htp.port = 1", &[], "shoal.htp.port"),
            ("shoal { http { port = ", &[], "HOCON"),
            ("", &["noequals"], "key=value"),
            ("", &["shoal.cluster.discovery.mode=dns"], "shoal.cluster.discovery.name"),
        ];
        for (file, sets, needle) in cases {
            let mut sets = sets.to_vec();
            sets.push("shoal.node.id=n1");
            let err = load(file, &[], &sets).unwrap_err().to_string();
            assert!(err.contains(needle), "{file:?} {sets:?}: {err}");
        }
    }

    #[test]
    fn quorum_counts() {
        assert_eq!(Consistency::Quorum.required(3), 2);
        assert_eq!(Consistency::Quorum.required(2), 2);
        assert_eq!(Consistency::One.required(3), 1);
        assert_eq!(Consistency::All.required(3), 3);
    }
}

#[cfg(test)]
mod example_tests {
    /// The commented examples under config/ must stay loadable.
    #[test]
    fn example_configs_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let cfg = super::Config::from_layers(&text, &Default::default(), &[])
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!cfg.node_id.is_empty());
            seen += 1;
        }
        assert!(seen >= 4);
    }
}
