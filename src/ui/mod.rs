//! The status page at `/ui`: the cluster as this node sees it (members with state, phi,
//! capacity and roles; the shard map with each replica's points and digest; hints and repair;
//! this node's write and query rates). Rendered on the server into plain HTML with its style
//! sheet inline, so the binary carries everything (no script, no CDN) and the page works
//! wherever HTML does; it reloads itself every few seconds.

use crate::node::Node;
use std::fmt::Write;
use std::sync::Arc;

/// Seconds between reloads.
const REFRESH_SECS: u32 = 5;
/// Shards listed at most (each is verified with its replicas on every render).
const SHARDS_SHOWN: usize = 200;
const STYLE: &str = include_str!("style.css");

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn state_badge(state: &str) -> String {
    format!("<span class=\"state state-{0}\">{0}</span>", esc(state))
}

fn liveness(state: crate::membership::Liveness) -> String {
    serde_json::to_value(state).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// Bytes of hints waiting, in all and by target.
fn hints_pending(pending: &[(String, u64)]) -> String {
    if pending.is_empty() {
        return "none".to_string();
    }
    let total: u64 = pending.iter().map(|(_, b)| b).sum();
    let by: Vec<String> = pending.iter().map(|(target, bytes)| format!("{} {bytes} B", esc(target))).collect();
    format!("{total} B <small>({})</small>", by.join(", "))
}

/// The whole page.
pub async fn page(node: &Arc<Node>) -> String {
    let status = node.status();
    let members = node.members().await;
    let shards = crate::api::shard_map(node, true, SHARDS_SHOWN).await;
    let total_shards = node.catalog.placement().len();
    let rates = node.metrics.rates.sample(&node.metrics, node.env.clock.now_ms());
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => esc(s),
        serde_json::Value::Null => "-".to_string(),
        other => esc(&other.to_string()),
    };
    let mut html = String::with_capacity(16 * 1024);
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>Shoal · {id}</title><style>{STYLE}</style></head><body>\
         <h1>Shoal node {id}</h1>\
         <div class=\"sub\">cluster <code>{cluster}</code> · version {version} · {state} · up {uptime} · \
         HTTP <code>{http}</code> · gossip <code>{gossip}</code> · reloads every {REFRESH_SECS} s</div>",
        id = text(&status["node_id"]),
        cluster = text(&status["cluster_id"]),
        version = text(&status["version"]),
        state = text(&status["state"]),
        uptime = duration(status["uptime_ms"].as_i64().unwrap_or(0)),
        http = text(&status["http_addr"]),
        gossip = text(&status["gossip_addr"]),
    );

    // Rates and counts of this node.
    let metrics = &node.metrics;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let (writes, queries) = match rates {
        Some((w, q)) => (format!("{w:.0}"), format!("{q:.1}")),
        None => ("measuring…".to_string(), "measuring…".to_string()),
    };
    let cards = [
        ("points stored/s", writes),
        ("queries/s", queries),
        ("points on this node", text(&status["points"])),
        ("shards on this node", text(&status["shards"])),
        ("hints pending", hints_pending(&node.hints.pending())),
        ("hints replayed", load(&metrics.hints_replayed).to_string()),
    ];
    html.push_str("<h2>This node</h2><div class=\"cards\" id=\"rates\">");
    for (label, value) in cards {
        let _ = write!(html, "<div class=\"card\"><b>{value}</b>{label}</div>");
    }
    html.push_str("</div>");

    // Members.
    let _ = write!(
        html,
        "<h2>Members ({})</h2><table id=\"members\"><tr><th>id</th><th>state</th><th>readiness</th>\
         <th>HTTP</th><th>gossip</th><th>phi</th><th>heartbeat age</th><th>free heap / load / cpu / disk</th>\
         <th>roles</th><th>generation</th></tr>",
        members.len()
    );
    for m in &members {
        let state = liveness(m.state);
        let phi = m.phi.map_or("-".to_string(), |p| format!("{p:.1}"));
        let capacity = m
            .capacity
            .as_ref()
            .map_or("-".to_string(), |c| format!("{:.2} / {:.2} / {:.2} / {:.2}", c.heap, c.load, c.cpu, c.disk));
        let http =
            m.http_addr.as_deref().map_or("-".to_string(), |a| format!("<a href=\"http://{0}/ui\">{0}</a>", esc(a)));
        let _ = write!(
            html,
            "<tr data-member=\"{id}\" data-state=\"{state}\"><td>{id}{me}</td><td>{badge}</td><td>{readiness}</td>\
             <td>{http}</td><td>{gossip}</td><td class=\"num\">{phi}</td><td class=\"num\">{age}</td>\
             <td>{capacity}</td><td>{roles}</td><td class=\"num\">{generation}</td></tr>",
            id = esc(&m.id),
            me = if m.is_self { " (this node)" } else { "" },
            badge = state_badge(&state),
            readiness = esc(&m.readiness),
            gossip = esc(&m.gossip_addr),
            age = m.heartbeat_age_ms.map_or("-".to_string(), |a| format!("{a} ms")),
            roles = esc(&m.roles.join(", ")),
            generation = m.generation,
        );
    }
    html.push_str("</table>");

    // Repair and leave progress.
    let repair = &status["repair"];
    let finished = metrics.repair_round_finished_ms.load(std::sync::atomic::Ordering::Relaxed);
    let last_round = if finished == 0 {
        "not yet".to_string()
    } else {
        format!("{} ago", duration(node.env.clock.now_ms() - finished))
    };
    let _ = write!(
        html,
        "<h2>Repair</h2><table id=\"repair\"><tr><th>running</th><th>rounds</th><th>last full round</th>\
         <th>blocks compared</th><th>blocks copied</th><th>points copied</th><th>shards re-replicated</th>\
         <th>leave</th></tr><tr><td>{}</td><td class=\"num\">{}</td><td>{last_round}</td><td class=\"num\">{}</td>\
         <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr></table>",
        text(&repair["running"]),
        text(&repair["rounds"]),
        load(&metrics.repair_blocks_compared),
        load(&metrics.repair_blocks_copied),
        load(&metrics.repair_points_copied),
        load(&metrics.shards_rereplicated),
        match &repair["leave"] {
            serde_json::Value::Null => "-".to_string(),
            l => format!(
                "{}/{} shards moved{}",
                text(&l["moved"]),
                text(&l["total"]),
                if l["abandoned"] == true { ", abandoned" } else { "" }
            ),
        },
    );

    // The shard map.
    let shown = if total_shards > shards.len() { format!(", the first {} shown", shards.len()) } else { String::new() };
    let _ = write!(
        html,
        "<h2>Shards ({total_shards}{shown})</h2><table id=\"shards\"><tr><th>db.namespace.metric</th><th>from</th>\
         <th>to</th><th>replicas: state, points, digest</th></tr>"
    );
    for shard in &shards {
        let replicas = shard["replicas"].as_array().cloned().unwrap_or_default();
        let digests: std::collections::BTreeSet<String> =
            replicas.iter().filter_map(|r| r["digest"].as_str().map(String::from)).collect();
        let cells: Vec<String> = replicas
            .iter()
            .map(|r| {
                let mismatch = if digests.len() > 1 { " class=\"mismatch\"" } else { "" };
                format!(
                    "{} {} · {} points · <code{mismatch}>{}</code>",
                    text(&r["id"]),
                    state_badge(r["state"].as_str().unwrap_or("unknown")),
                    text(&r["points"]),
                    text(&r["digest"])
                )
            })
            .collect();
        let time = |k: &str| shard[k].as_i64().map_or("-".to_string(), crate::influxql::rfc3339);
        let _ = write!(
            html,
            "<tr><td>{}.{}.{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            text(&shard["db"]),
            text(&shard["namespace"]),
            text(&shard["metric"]),
            time("start"),
            time("end"),
            cells.join("<br>")
        );
    }
    html.push_str("</table></body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(super::esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(super::duration(3_725_000), "1h 2m");
    }
}
