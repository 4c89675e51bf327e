//! The `shoal` command: `start` runs a node; the other subcommands are clients of a node's HTTP API.

mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

// The ingest path allocates and frees large column vectors all the time; mimalloc keeps freed
// memory for reuse where glibc malloc maps and unmaps it (page faults on every new buffer).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc by default commits its arenas up front and holds freed pages for 10 ms (100 ms in
/// arenas) before it returns them: a node loading at full speed then sits on ~110 MiB of freed
/// memtable and body buffers (peak RSS 290 MiB against a 200 MiB peak heap in the 10M-line
/// benchmark). Committing on demand and returning freed pages at once brings the peak to
/// ~155 MiB for a few percent of the load rate. Set from a constructor because the first
/// allocation, before `main`, creates the first arena; a `MIMALLOC_*` variable set by the
/// operator wins (read with `getenv`, which does not allocate).
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static RETURN_FREED_MEMORY_PROMPTLY: extern "C" fn() = return_freed_memory_promptly;

#[cfg(target_os = "linux")]
extern "C" fn return_freed_memory_promptly() {
    // Positions in mimalloc's `mi_option_e` (v2), which libmimalloc-sys does not name.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    for (option, var) in [(ARENA_EAGER_COMMIT, c"MIMALLOC_ARENA_EAGER_COMMIT"), (PURGE_DELAY, c"MIMALLOC_PURGE_DELAY")]
    {
        // SAFETY: getenv of a constant name, and a plain integer option set before any thread.
        unsafe {
            if libc::getenv(var.as_ptr()).is_null() {
                libmimalloc_sys::mi_option_set(option, 0);
            }
        }
    }
}

#[derive(Parser)]
#[command(name = "shoal", version, about = "Shoal: a masterless clustered time-series database")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct NodeArg {
    /// The node to talk to.
    #[arg(long, default_value = "http://127.0.0.1:9000", env = "SHOAL_NODE")]
    node: String,
    /// User name, when the node has a users file (shoal.auth.file).
    #[arg(long, env = "SHOAL_USER")]
    user: Option<String>,
    /// Password of --user.
    #[arg(long, env = "SHOAL_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// CA certificates (PEM) to verify an https --node against.
    #[arg(long, env = "SHOAL_CA_FILE")]
    ca_file: Option<PathBuf>,
}

/// Where line protocol goes, for `insert` and `import`.
#[derive(clap::Args)]
struct LinesTarget {
    #[arg(long)]
    db: String,
    #[arg(long)]
    namespace: String,
    /// Timestamp unit of the lines: ns, us, ms or s.
    #[arg(long, default_value = "ns")]
    precision: String,
}

impl NodeArg {
    fn api(&self) -> anyhow::Result<cli::bulk::Api> {
        Ok(cli::bulk::Api { http: self.http()?, node: self.node.trim_end_matches('/').to_string() })
    }

    /// An HTTP client that sends --user/--password (HTTP Basic) with every request.
    fn http(&self) -> anyhow::Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(user) = &self.user {
            let pair = format!("{user}:{}", self.password.as_deref().unwrap_or_default());
            let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pair);
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Basic {encoded}"))?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        shoal::tls::install_default_provider();
        let mut builder =
            reqwest::Client::builder().default_headers(headers).timeout(std::time::Duration::from_secs(60));
        if let Some(ca) = &self.ca_file {
            builder = builder.tls_backend_preconfigured(shoal::tls::client_config(ca).map_err(anyhow::Error::msg)?);
        }
        Ok(builder.build()?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a node. Without --config it runs a single-node cluster on the embedded defaults
    /// (HTTP on 127.0.0.1:9000, data in ./shoal-data).
    Start {
        /// HOCON config file; keys it sets override the embedded defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one key, e.g. --set shoal.http.port=9001 (repeatable; beats file and environment).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Start even though a WAL file (not the last) has a corrupt record: cut that file at
        /// the record and go on. The records behind it in that file are lost on this node
        /// (repair copies them back from other replicas). Without it such a node refuses to
        /// start, naming the file and offset.
        #[arg(long)]
        salvage_wal: bool,
    },
    /// Run a query (NSDb SQL) and print the records as JSON.
    Query {
        #[command(flatten)]
        node: NodeArg,
        #[arg(long)]
        db: String,
        #[arg(long)]
        namespace: String,
        /// The statement, e.g. "SELECT avg(value) FROM cpu GROUP BY region".
        sql: String,
    },
    /// Insert Influx line protocol, from the arguments or, with none, from standard input.
    Insert {
        #[command(flatten)]
        node: NodeArg,
        #[command(flatten)]
        target: LinesTarget,
        /// Lines such as `cpu,region=eu value=0.5 1700000000000000000`.
        lines: Vec<String>,
    },
    /// Print a node's status (or, with --member, another member's status through that node).
    Status {
        #[command(flatten)]
        node: NodeArg,
        /// The id of another member to ask about.
        #[arg(long)]
        member: Option<String>,
    },
    /// Print the cluster's members as the node sees them, one line each (like `nodetool status`).
    Members {
        #[command(flatten)]
        node: NodeArg,
        /// Print the JSON answer instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make the node leave the cluster gracefully and exit; waits until it has.
    Leave {
        #[command(flatten)]
        node: NodeArg,
    },
    /// Back up every shard of a db (read from live replicas through --node) into a new
    /// directory: a manifest and one compressed file of points per shard.
    Backup {
        #[command(flatten)]
        node: NodeArg,
        #[arg(long)]
        db: String,
        /// The directory to create.
        out: PathBuf,
    },
    /// Load a backup into the cluster of --node (an empty one, or another one).
    Restore {
        #[command(flatten)]
        node: NodeArg,
        /// Restore into this db instead of the one backed up.
        #[arg(long)]
        db: Option<String>,
        /// The backup directory.
        dir: PathBuf,
    },
    /// Load a file of Influx line protocol (`-` for standard input) in batches, with progress.
    Import {
        #[command(flatten)]
        node: NodeArg,
        #[command(flatten)]
        target: LinesTarget,
        file: PathBuf,
    },
    /// Start N nodes of one cluster on this machine for trying Shoal; prints their addresses
    /// and runs until Ctrl-C (which stops them all).
    LocalCluster {
        /// How many nodes (1 to 16).
        nodes: usize,
        /// Where the nodes keep their data dirs and logs.
        #[arg(long, default_value = "./shoal-local")]
        dir: PathBuf,
        /// HTTP port of node1 (node2 takes the next, and so on); 0 lets the OS choose every port.
        #[arg(long, default_value_t = 9001)]
        http_port: u16,
        /// Gossip (UDP) port of node1 (node2 takes the next, and so on).
        #[arg(long, default_value_t = 7281)]
        gossip_port: u16,
        /// Copies of each shard (at most the number of nodes).
        #[arg(long, default_value_t = 2)]
        replication_factor: usize,
        /// Override one key on every node, as for `shoal start` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Print a new random cluster secret (for shoal.cluster.secret).
    Keygen,
    /// Show or change the cluster keyring on every live member: install a new secret, use it
    /// (seal and sign with it), remove the old one (docs/security.md).
    Keyring {
        #[command(flatten)]
        node: NodeArg,
        /// list, install, use or remove.
        #[arg(value_parser = ["list", "install", "use", "remove"])]
        op: String,
        /// The secret to install, use or remove.
        key: Option<String>,
    },
    /// Print the argon2 hash of a password (read from standard input) for a users file.
    HashPassword,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shoal: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Start { config, sets, salvage_wal } => start(config, sets, salvage_wal).await,
            Command::Query { node, db, namespace, sql } => {
                let body = serde_json::json!({ "db": db, "namespace": namespace, "queryString": sql });
                client(node.http()?.post(format!("{}/query", node.node)).json(&body)).await
            }
            Command::Insert { node, target: LinesTarget { db, namespace, precision }, lines } => {
                let body = if lines.is_empty() {
                    std::io::read_to_string(std::io::stdin()).context("reading standard input")?
                } else {
                    lines.join("\n")
                };
                let url = reqwest::Url::parse_with_params(
                    &format!("{}/write", node.node),
                    &[("db", db), ("namespace", namespace), ("precision", precision)],
                )
                .context("--node must be a URL such as http://127.0.0.1:9000")?;
                let req = node.http()?.post(url).body(body);
                client(req).await
            }
            Command::Status { node, member } => {
                let mut url = reqwest::Url::parse(&format!("{}/status", node.node)).context("--node must be a URL")?;
                if let Some(m) = member {
                    url.query_pairs_mut().append_pair("node", &m);
                }
                client(node.http()?.get(url)).await
            }
            Command::Members { node, json } => members(&node, json).await,
            Command::Backup { node, db, out } => cli::bulk::backup(&node.api()?, &db, &out).await,
            Command::Restore { node, db, dir } => cli::bulk::restore(&node.api()?, &dir, db.as_deref()).await,
            Command::Import { node, target: LinesTarget { db, namespace, precision }, file } => {
                cli::bulk::import(&node.api()?, &file, &db, &namespace, &precision).await
            }
            Command::LocalCluster { nodes, dir, http_port, gossip_port, replication_factor, sets } => {
                cli::local_cluster::run(cli::local_cluster::Options {
                    nodes,
                    dir,
                    http_port,
                    gossip_port,
                    replication_factor,
                    sets,
                })
                .await
            }
            Command::Leave { node } => leave(&node).await,
            Command::Keygen => {
                println!("{}", shoal::keyring::generate_secret());
                Ok(())
            }
            Command::Keyring { node, op, key } => {
                let url = format!("{}/cluster/keyring", node.node);
                match (op.as_str(), key) {
                    ("list", _) => client(node.http()?.get(url)).await,
                    (op, Some(key)) => {
                        client(node.http()?.post(url).json(&serde_json::json!({ "op": op, "key": key }))).await
                    }
                    (op, None) => anyhow::bail!("shoal keyring {op} needs the secret as its argument"),
                }
            }
            Command::HashPassword => {
                let password = std::io::read_to_string(std::io::stdin()).context("reading the password")?;
                println!("{}", shoal::auth::hash_password(password.trim_end_matches(['\n', '\r']))?);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sends a request and prints the answer; a non-2xx answer is an error naming the server's message.
async fn client(req: reqwest::RequestBuilder) -> anyhow::Result<()> {
    let resp = req.send().await.context("cannot reach the node (is it running? see --node)")?;
    let status = resp.status();
    let text = resp.text().await.context("reading the answer")?;
    let pretty = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(text);
    if status.is_success() {
        if !pretty.is_empty() {
            // A closed pipe (`shoal status | head`) is not an error worth a panic.
            let _ = writeln!(std::io::stdout(), "{pretty}");
        }
        Ok(())
    } else {
        anyhow::bail!("the node answered {status}: {pretty}")
    }
}

async fn members(arg: &NodeArg, json: bool) -> anyhow::Result<()> {
    let node = &arg.node;
    let resp = arg
        .http()?
        .get(format!("{node}/cluster/members"))
        .send()
        .await
        .context("cannot reach the node (see --node)")?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("reading the answer")?;
    anyhow::ensure!(status.is_success(), "the node answered {status}: {body}");
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let header = ["", "ID", "STATE", "READINESS", "HTTP", "GOSSIP", "HB AGE ms", "PHI", "FREE h/l/c/d", "ROLES"];
    println!(
        "{:<1} {:<16} {:<8} {:<9} {:<21} {:<21} {:>9} {:>5}  {:<19} {}",
        header[0], header[1], header[2], header[3], header[4], header[5], header[6], header[7], header[8], header[9]
    );
    for m in body["members"].as_array().into_iter().flatten() {
        let marker = if m["is_self"].as_bool() == Some(true) { "*" } else { "" };
        let phi = m["phi"].as_f64().map_or("-".to_string(), |p| format!("{p:.1}"));
        let roles: Vec<String> = m["roles"].as_array().into_iter().flatten().map(text).collect();
        let cap = &m["capacity"];
        let capacity = if cap.is_null() {
            "-".to_string()
        } else {
            let f = |k: &str| cap[k].as_f64().map_or("-".to_string(), |v| format!("{v:.2}"));
            format!("{}/{}/{}/{}", f("heap"), f("load"), f("cpu"), f("disk"))
        };
        println!(
            "{:<1} {:<16} {:<8} {:<9} {:<21} {:<21} {:>9} {:>5}  {:<19} {}",
            marker,
            text(&m["id"]),
            text(&m["state"]),
            text(&m["readiness"]),
            text(&m["http_addr"]),
            text(&m["gossip_addr"]),
            text(&m["heartbeat_age_ms"]),
            phi,
            capacity,
            roles.join(",")
        );
    }
    Ok(())
}

async fn leave(arg: &NodeArg) -> anyhow::Result<()> {
    let node = &arg.node;
    let http = arg.http()?;
    let resp = http.post(format!("{node}/cluster/leave")).send().await.context("cannot reach the node (see --node)")?;
    if !resp.status().is_success() {
        let status = resp.status();
        anyhow::bail!("the node answered {status}: {}", resp.text().await.unwrap_or_default());
    }
    println!("leaving: announced to the cluster; handing off shards");
    // A bar on a terminal; a line per change otherwise (scripts and logs read those).
    let bar = cli::bulk::leave_bar();
    let mut last = None;
    let deadline = std::time::Duration::from_secs(3600);
    let started = tokio::time::Instant::now();
    while started.elapsed() < deadline {
        let status = match http.get(format!("{node}/status")).send().await {
            Ok(resp) => resp.json::<serde_json::Value>().await.ok(),
            Err(_) => {
                bar.finish_and_clear();
                println!("left");
                return Ok(());
            }
        };
        let leave = status.as_ref().map(|s| s["repair"]["leave"].clone()).filter(|l| !l.is_null());
        if let Some(leave) = leave {
            let count = |k: &str| leave[k].as_u64().unwrap_or(0);
            let waiting = if count("kept") > 0 {
                format!(", {} waiting (no other storage node could take them yet)", count("kept"))
            } else {
                String::new()
            };
            let exiting = if leave["done"] == true { "; waiting for the node to exit" } else { "" };
            bar.set_length(count("total"));
            bar.set_position(count("moved"));
            bar.set_message(format!("{waiting}{exiting}"));
            let line = format!("shards moved {}/{}{waiting}{exiting}", count("moved"), count("total"));
            if bar.is_hidden() && last.as_ref() != Some(&line) {
                println!("{line}");
                last = Some(line);
            }
            if leave["abandoned"] == true {
                bar.abandon();
                anyhow::bail!(shoal::node::LeaveError::Abandoned {
                    kept: count("kept") as usize,
                    total: count("total") as usize
                });
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("the node is still running after {deadline:?}")
}

/// The UDP address to gossip on. chitchat binds the socket itself, so port 0 is resolved here
/// by letting the OS pick a free port and handing that number on.
async fn gossip_listen_addr(cfg: &shoal::config::Config) -> anyhow::Result<std::net::SocketAddr> {
    let context = || {
        format!(
            "cannot listen for gossip on {}:{}/UDP (shoal.gossip.host, shoal.gossip.port)",
            cfg.gossip_host, cfg.gossip_port
        )
    };
    let probe = std::net::UdpSocket::bind((cfg.gossip_host.as_str(), cfg.gossip_port)).with_context(context)?;
    Ok(probe.local_addr()?)
}

/// Raises the soft limit on open files to the hard limit: every connection, segment and WAL
/// file is a descriptor, and the common soft default (1024) is far below what a busy node
/// holds. Returns the limit in force.
fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct handed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

async fn start(config: Option<PathBuf>, sets: Vec<String>, salvage_wal: bool) -> anyhow::Result<()> {
    let open_files = raise_open_files_limit();
    let mut cfg = shoal::config::Config::load(config.as_deref(), &sets)?;
    cfg.wal_salvage = salvage_wal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let env_names: Vec<String> = std::env::vars().map(|(name, _)| name).collect();
    for name in shoal::config::unknown_env_vars(env_names.iter().map(String::as_str)) {
        tracing::warn!(variable = %name, "ignoring an environment variable that names no config key (docs/configuration.md)");
    }
    let addr_file = cfg.data_dir.join("http.addr");
    let _ = std::fs::remove_file(&addr_file);
    let listener = tokio::net::TcpListener::bind((cfg.http_host.as_str(), cfg.http_port)).await.with_context(|| {
        format!("cannot listen on {}:{} (shoal.http.host, shoal.http.port)", cfg.http_host, cfg.http_port)
    })?;
    let local = listener.local_addr()?;
    let gossip_listen = gossip_listen_addr(&cfg).await?;
    let gossip_advertise =
        match &cfg.gossip_advertise {
            Some(a) => tokio::net::lookup_host(a.as_str()).await.ok().and_then(|mut addrs| addrs.next()).with_context(
                || format!("config key shoal.gossip.advertise: cannot resolve {a:?} (expected host:port)"),
            )?,
            None if gossip_listen.ip().is_unspecified() => {
                anyhow::bail!(
                    "config key shoal.gossip.advertise: required when shoal.gossip.host is {}",
                    gossip_listen.ip()
                )
            }
            None => gossip_listen,
        };
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let keyring = shoal::keyring::Keyring::open(&cfg.data_dir, cfg.cluster_secret.as_deref())?.map(std::sync::Arc::new);
    let transport: Box<dyn chitchat::transport::Transport> = match &keyring {
        Some(keyring) => Box::new(shoal::membership::sealed::SealedUdpTransport {
            keyring: keyring.clone(),
            context: cfg.cluster_id.as_bytes().to_vec(),
        }),
        None => Box::new(chitchat::transport::UdpTransport),
    };
    let capacity_probe = Box::new(shoal::capacity::SysinfoProbe::new(&cfg.data_dir));
    let clock = std::sync::Arc::new(shoal::env::SystemClock);
    // A node serving TLS calls its peers over https, trusting shoal.http.tls.ca-file.
    let peer_tls = match (&cfg.tls_cert_file, &cfg.tls_ca_file) {
        (None, _) => None,
        (Some(_), Some(ca)) => Some(shoal::tls::client_config(ca).map_err(anyhow::Error::msg)?),
        (Some(_), None) => anyhow::bail!(
            "config key shoal.http.tls.ca-file: required with shoal.http.tls.cert-file (the CAs peers' certificates are checked against)"
        ),
    };
    let peers = std::sync::Arc::new(shoal::peer::HttpPeers::new(&cfg.cluster_id, keyring.clone(), clock, peer_tls)?);
    let io = shoal::node::NodeIo {
        http_addr: local,
        gossip_listen,
        gossip_advertise,
        gossip_transport: transport.as_ref(),
        capacity_probe,
        peers,
        keyring,
    };
    let node = shoal::node::Node::open(cfg, shoal::env::Env::production(), io).await?;
    // Tests and scripts that start a node on port 0 read its addresses from here.
    shoal::storage::write_atomic(&node.cfg.data_dir.join("gossip.addr"), gossip_advertise.to_string().as_bytes())?;
    shoal::storage::write_atomic(&addr_file, local.to_string().as_bytes())?;
    tracing::info!(node = %node.cfg.node_id, http = %local, gossip = %gossip_advertise, data_dir = %node.cfg.data_dir.display(), open_files, "shoal node started");
    let stopping = node.clone();
    let shutdown = async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        // A signal is a stop, not a decommission: a rolling restart or a reboot must not take
        // this node out of its shards' placements (only `shoal leave` does). Peers see it dead,
        // hint its writes, and repair it when it returns with its disk.
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = stopping.stopped() => {}
        }
        tracing::info!("shutting down");
    };
    shoal::serve(node.clone(), listener, shutdown).await?;
    if let Err(e) = node.storage.flush_all().await {
        tracing::warn!(error = %e, "could not compact on shutdown; the WAL will be replayed on start");
    }
    Ok(())
}
