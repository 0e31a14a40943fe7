//! Talks to a node's admin API: members, events, drain, stats. `--json` prints what the node
//! answered as JSON (one object per line for `watch`), for scripts.
//!
//! ```text
//! meshctl --addr http://127.0.0.1:50051 members
//! meshctl --addr http://127.0.0.1:50051 members --json
//! meshctl --addr http://127.0.0.1:50051 watch
//! meshctl --addr http://127.0.0.1:50051 stats
//! meshctl --addr http://127.0.0.1:50051 drain
//! meshctl --addr http://127.0.0.1:50051 undrain
//! ```
//!
//! Installed with the server (`cargo install --path .`), or run from a checkout with
//! `cargo run --bin meshctl -- …`.
//!
//! It exits non-zero, with a message naming the address, when the node cannot be reached.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::time::Instant;

mod client;
mod table;
use mesh::proto::admin::v1::{
    DrainRequest, ListMembersRequest, ListMembersResponse, MemberEvent, StatsRequest,
    StatsResponse, WatchEventsRequest, mesh_admin_client::MeshAdminClient,
};
use table::{Table, human_bytes, human_ms};

#[derive(Parser, Debug)]
#[command(about = "Inspect and steer a mesh node through its admin API")]
struct Args {
    /// The node's gRPC address (https:// with --tls-ca).
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Print the node's answer as JSON (one object per line for `watch`).
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    tls: client::TlsArgs,
    /// A file whose first line is a bearer token with the `admin` right, for nodes that check
    /// tokens (a REAPI server with a token file).
    #[arg(long, global = true)]
    token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Adds `authorization: Bearer …` to every call when a token was given.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// The admin client, with the token if one was given.
type Admin = MeshAdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// The bearer token in `path` (its first non-empty line).
fn bearer(path: Option<&std::path::Path>) -> Result<Bearer, String> {
    let Some(path) = path else {
        return Ok(Bearer(None));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the token file {}: {e}", path.display()))?;
    let token = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .ok_or_else(|| format!("the token file {} is empty", path.display()))?;
    let mut value: tonic::metadata::AsciiMetadataValue = format!("Bearer {token}")
        .parse()
        .map_err(|_| format!("the token in {} is not visible ASCII", path.display()))?;
    value.set_sensitive(true);
    Ok(Bearer(Some(value)))
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every member the node knows — live, failed and left — with its load and status age.
    Members,
    /// Stream membership events until interrupted.
    Watch,
    /// Take the node out of routing (it stays a member and finishes what it runs).
    Drain {
        /// Undrain instead (same as `undrain`).
        #[arg(long)]
        undo: bool,
    },
    /// Put a drained node back into routing.
    Undrain,
    /// Gossip traffic and drops, routing decisions, and calls forwarded to and from each peer.
    Stats,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshctl: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let addr = args.addr.as_str();
    let token = bearer(args.token_file.as_deref())?;
    let mut client =
        MeshAdminClient::with_interceptor(client::connect(addr, &args.tls).await?, token);
    let failed =
        |what: &'static str| move |status: tonic::Status| client::call_failed(addr, what, &status);
    match args.command {
        Command::Members => {
            let members = client
                .list_members(ListMembersRequest {})
                .await
                .map_err(failed("the admin API (ListMembers)"))?
                .into_inner();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&members)?);
            } else {
                print!("{}", members_text(&members));
            }
        }
        Command::Watch => {
            let mut events = client
                .watch_events(WatchEventsRequest {})
                .await
                .map_err(failed("the admin API (WatchEvents)"))?
                .into_inner();
            if !args.json {
                println!("watching {addr}; Ctrl-C to stop");
            }
            let started = Instant::now();
            let mut last_status = String::new();
            while let Some(event) = events.message().await.map_err(failed("watching events"))? {
                if args.json {
                    println!("{}", serde_json::to_string(&event)?);
                } else {
                    println!("{:>8}  {}", human_ms(millis(started)), event_text(&event));
                }
                if event.kind == "local-status" {
                    last_status = event.local_status;
                }
            }
            if !matches!(last_status.as_str(), "left" | "defunct") {
                return Err(format!("the node at {addr} ended the event stream").into());
            }
        }
        Command::Drain { undo } => drain(&mut client, addr, !undo, args.json).await?,
        Command::Undrain => drain(&mut client, addr, false, args.json).await?,
        Command::Stats => {
            let stats = client
                .stats(StatsRequest {})
                .await
                .map_err(failed("the admin API (Stats)"))?
                .into_inner();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{}", stats_text(&stats));
            }
        }
    }
    Ok(())
}

async fn drain(
    client: &mut Admin,
    addr: &str,
    draining: bool,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let reply = client
        .drain(DrainRequest { draining })
        .await
        .map_err(|status| client::call_failed(addr, "the admin API (Drain)", &status))?
        .into_inner();
    if json {
        println!("{}", serde_json::to_string(&reply)?);
    } else if reply.draining {
        println!("{addr} is draining: it takes no new work and reports NOT_SERVING");
    } else {
        println!("{addr} takes work again");
    }
    Ok(())
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn members_text(members: &ListMembersResponse) -> String {
    let live = members
        .members
        .iter()
        .filter(|m| matches!(m.status.as_str(), "alive" | "suspect"))
        .count();
    let mut out = format!(
        "{} ({}) sees {} live member{}, {} failed or left; coordinator {}\n",
        members.local_node_id,
        members.local_status,
        live,
        if live == 1 { "" } else { "s" },
        members.members.len() - live,
        if members.coordinator.is_empty() {
            "none"
        } else {
            &members.coordinator
        }
    );
    let mut table = Table::new(&[
        "NODE",
        "STATUS",
        ">FOR",
        "GOSSIP",
        ">LOAD",
        ">RATIO",
        ">STATE AGE",
        "GRPC",
        "TAGS",
        "NOTES",
    ]);
    for m in &members.members {
        let state = m.state.as_ref();
        let (load, ratio) = match state {
            Some(s) if s.max_concurrency > 0 => (
                format!("{}/{}", s.pending, s.max_concurrency),
                format!("{:.2}", f64::from(s.pending) / f64::from(s.max_concurrency)),
            ),
            Some(s) => (format!("{}/0", s.pending), "-".to_owned()),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let mut tags: Vec<String> = state
            .map(|s| s.tags.iter().map(|(k, v)| format!("{k}={v}")).collect())
            .unwrap_or_default();
        tags.sort();
        let mut notes = Vec::new();
        if m.local {
            notes.push("local");
        }
        if m.coordinator {
            notes.push("coordinator");
        }
        if state.is_some_and(|s| s.draining) {
            notes.push("draining");
        }
        table.row(vec![
            m.node_id.clone(),
            m.status.clone(),
            m.status_age_ms.map_or_else(|| "-".to_owned(), human_ms),
            m.gossip_addr.clone(),
            load,
            ratio,
            state.map_or_else(|| "-".to_owned(), |_| human_ms(m.state_age_ms)),
            state.map_or_else(|| "-".to_owned(), |s| s.grpc_endpoint.clone()),
            if tags.is_empty() {
                "-".to_owned()
            } else {
                tags.join(",")
            },
            notes.join(","),
        ]);
    }
    out.push_str(&table.render());
    out.push('\n');
    out
}

fn event_text(event: &MemberEvent) -> String {
    match event.kind.as_str() {
        "local-status" => format!("local-status  now {}", event.local_status),
        "updated" => {
            let state = event.state.clone().unwrap_or_default();
            format!(
                "updated       {} v{} load {}/{}{}",
                event.node_id,
                state.version,
                state.pending,
                state.max_concurrency,
                if state.draining { " draining" } else { "" }
            )
        }
        "coordinator" => format!(
            "coordinator   {} (was {})",
            if event.node_id.is_empty() {
                "none"
            } else {
                &event.node_id
            },
            if event.previous_node_id.is_empty() {
                "none"
            } else {
                &event.previous_node_id
            }
        ),
        "rejoined" => format!(
            "rejoined      {} at {} gen {} (was {} gen {})",
            event.node_id,
            event.gossip_addr,
            event.generation,
            event.previous_gossip_addr,
            event.previous_generation
        ),
        kind => format!(
            "{kind:<12}  {} at {} gen {}",
            event.node_id, event.gossip_addr, event.generation
        ),
    }
}

fn stats_text(stats: &StatsResponse) -> String {
    let gossip = stats.gossip.clone().unwrap_or_default();
    let routing = stats.routing.clone().unwrap_or_default();
    let mut out = format!("node {}\n", stats.local_node_id);
    let sorted = |map: &std::collections::HashMap<String, u64>| {
        let mut pairs: Vec<(&String, &u64)> = map.iter().collect();
        pairs.sort();
        pairs
            .into_iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.push_str(&format!(
        "  gossip     in {} datagrams ({}), out {} ({}), {} send failures\n",
        gossip.datagrams_received,
        human_bytes(gossip.bytes_received),
        gossip.datagrams_sent,
        human_bytes(gossip.bytes_sent),
        gossip.send_failures
    ));
    out.push_str(&format!("  dropped    {}\n", sorted(&gossip.drops)));
    out.push_str(&format!(
        "  members    {} suspicions, {} flaps, {} discovery failures\n",
        gossip.suspicions, gossip.flaps, gossip.discovery_failures
    ));
    let order = ["local", "peer", "no_matching_node", "no_available_node"];
    let decisions: Vec<String> = order
        .iter()
        .map(|k| format!("{k} {}", routing.decisions.get(*k).copied().unwrap_or(0)))
        .collect();
    out.push_str(&format!(
        "  decisions  {}; {} held for a free slot\n",
        decisions.join(", "),
        routing.held
    ));
    if routing.layer {
        out.push_str(&format!(
            "  calls      {} served here ({} forwarded in), {} forwarded out, {} to owners, \
             {} rerouted, {} unreachable, {} relays broken, {} refused\n",
            routing.local,
            routing.forwarded_in,
            routing.forwarded_out,
            routing.to_owner,
            routing.rerouted,
            routing.unreachable,
            routing.relays_broken,
            routing.refused
        ));
    }
    if !stats.server.is_empty() {
        // The server's own counters (mesh-reapi: executions, cache, stores), by name.
        let mut pairs: Vec<(&String, &u64)> = stats.server.iter().collect();
        pairs.sort();
        let mut line = String::new();
        for (name, value) in pairs {
            let value = if name.ends_with("bytes") {
                human_bytes(*value)
            } else {
                value.to_string()
            };
            let item = format!("{name} {value}");
            if !line.is_empty() && line.len() + item.len() > 80 {
                out.push_str(&format!("  server     {line}\n"));
                line.clear();
            }
            if !line.is_empty() {
                line.push_str(", ");
            }
            line.push_str(&item);
        }
        out.push_str(&format!("  server     {line}\n"));
    }
    let outcomes = |map: &std::collections::HashMap<String, u64>| {
        let order = ["ok", "error", "broken", "cancelled", "unreachable"];
        let parts: Vec<String> = order
            .iter()
            .filter_map(|k| {
                let n = map.get(*k).copied().unwrap_or(0);
                (n > 0).then(|| format!("{n} {k}"))
            })
            .collect();
        if parts.is_empty() {
            "0".to_owned()
        } else {
            parts.join(", ")
        }
    };
    let mut table = Table::new(&[
        "PEER",
        "STATUS",
        ">STATE AGE",
        "FORWARDED TO",
        "FORWARDED FROM",
    ]);
    for peer in &stats.peers {
        table.row(vec![
            peer.node_id.clone(),
            peer.status.clone(),
            peer.state_age_ms.map_or_else(|| "-".to_owned(), human_ms),
            outcomes(&peer.forwards_out),
            outcomes(&peer.forwards_in),
        ]);
    }
    out.push('\n');
    out.push_str(&table.render());
    out.push('\n');
    out
}
