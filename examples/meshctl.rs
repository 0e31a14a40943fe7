//! Talks to a node's admin API: list members, watch events, drain.
//!
//! ```text
//! cargo run --example meshctl -- --addr http://127.0.0.1:50051 members
//! cargo run --example meshctl -- --addr http://127.0.0.1:50051 watch
//! cargo run --example meshctl -- --addr http://127.0.0.1:50051 drain
//! cargo run --example meshctl -- --addr http://127.0.0.1:50051 drain --undo
//! ```

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[path = "support/client.rs"]
mod client;
use mesh::proto::admin::v1::{
    DrainRequest, ListMembersRequest, WatchEventsRequest, mesh_admin_client::MeshAdminClient,
};

#[derive(Parser, Debug)]
#[command(about = "Inspect and steer a mesh node through its admin API")]
struct Args {
    /// The node's gRPC address (https:// with --tls-ca).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    #[command(flatten)]
    tls: client::TlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every member the node knows, with its load.
    Members,
    /// Stream membership events until interrupted.
    Watch,
    /// Take the node out of routing (it stays a member), or put it back with --undo.
    Drain {
        /// Undrain.
        #[arg(long)]
        undo: bool,
    },
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
    let mut client = MeshAdminClient::new(client::connect(&args.addr, &args.tls).await?);
    match args.command {
        Command::Members => {
            let members = client
                .list_members(ListMembersRequest {})
                .await?
                .into_inner();
            println!(
                "{} ({}) sees {} members",
                members.local_node_id,
                members.local_status,
                members.members.len()
            );
            println!(
                "{:<20} {:<22} {:<8} {:>8} {:>6} {:>9} {:<24} tags",
                "node", "gossip", "status", "load", "ratio", "age ms", "grpc"
            );
            for m in members.members {
                let state = m.state.unwrap_or_default();
                let ratio = if state.max_concurrency == 0 {
                    "-".to_owned()
                } else {
                    format!(
                        "{:.2}",
                        f64::from(state.pending) / f64::from(state.max_concurrency)
                    )
                };
                let mut tags: Vec<String> =
                    state.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                tags.sort();
                println!(
                    "{:<20} {:<22} {:<8} {:>8} {:>6} {:>9} {:<24} {}{}",
                    format!("{}{}", m.node_id, if m.local { "*" } else { "" }),
                    m.gossip_addr,
                    m.status,
                    format!("{}/{}", state.pending, state.max_concurrency),
                    ratio,
                    m.state_age_ms,
                    state.grpc_endpoint,
                    tags.join(","),
                    if state.draining { " (draining)" } else { "" }
                );
            }
        }
        Command::Watch => {
            let mut events = client
                .watch_events(WatchEventsRequest {})
                .await?
                .into_inner();
            while let Some(event) = events.message().await? {
                if event.kind == "local-status" {
                    println!("local-status {}", event.local_status);
                } else {
                    println!(
                        "{:<10} {} {} gen {}",
                        event.kind, event.node_id, event.gossip_addr, event.generation
                    );
                }
            }
        }
        Command::Drain { undo } => {
            let reply = client
                .drain(DrainRequest { draining: !undo })
                .await?
                .into_inner();
            println!("draining = {}", reply.draining);
        }
    }
    Ok(())
}
