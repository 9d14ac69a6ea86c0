//! The `berth` command line: parsing only; the work is in the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use berth::config::Config;
use berth::node::RunningNode;

#[derive(Parser)]
#[command(name = "berth", version, about = "A replicated, highly available OCI registry")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a registry node (with no flags: one node on 127.0.0.1:5000, data in ./berth-data).
    Serve {
        /// TOML configuration file; flags below override it.
        #[arg(long, env = "BERTH_CONFIG")]
        config: Option<PathBuf>,
        /// HTTP API listen address.
        #[arg(long, env = "BERTH_HTTP")]
        http: Option<String>,
        /// Cluster gRPC listen address.
        #[arg(long, env = "BERTH_GRPC")]
        grpc: Option<String>,
        /// Data directory.
        #[arg(long, env = "BERTH_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Cmd::Serve {
            config,
            http,
            grpc,
            data_dir,
        } => {
            let mut cfg = match config {
                Some(p) => Config::load(&p)?,
                None => Config::default(),
            };
            if let Some(h) = http {
                cfg.http = h;
            }
            if let Some(g) = grpc {
                cfg.grpc = g;
            }
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            rt.block_on(async move {
                let node = RunningNode::start(cfg).await?;
                tokio::signal::ctrl_c().await?;
                tracing::info!("shutting down");
                node.shutdown().await;
                anyhow::Ok(())
            })
        }
    }
}
