//! `mesh-lab`: the whole mesh on one Linux machine, in network namespaces.

use std::path::PathBuf;

use clap::Parser;
use mesh_lab::runner::{self, Lab, Names, Options};
use mesh_lab::{component, demo};

/// Runs the mesh on this machine: a network namespace per node and per pod, istiod-lite on the
/// demo manifests, a node agent and a ztunnel per node capturing its ambient pods' traffic, each
/// pod started through the mesh-cni plugin (run as a container runtime runs it), then the pods'
/// apps. Needs root; touches none of the host's own interfaces. The mesh-cni and mesh-node-agent
/// binaries must be beside this one (`cargo build -p mesh-cni`, with `--release` for a release
/// build).
#[derive(Debug, Parser)]
#[command(name = "mesh-lab", version)]
enum Command {
    /// Brings the lab up, sends demo traffic and shows what the mesh did; stays up until Ctrl-C
    /// (or exits after the demo with --exit-after-demo), then removes everything.
    Up {
        #[command(flatten)]
        files: Files,
        /// Leave (and clean up) right after the demo.
        #[arg(long)]
        exit_after_demo: bool,
    },
    /// Removes a lab: its processes, namespaces and files (also after a crash).
    Down {
        /// The lab's state directory.
        #[arg(long, default_value = runner::DEFAULT_DIR)]
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct Files {
    /// Nodes, addresses and pod CIDRs.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/topology.yaml"))]
    topology: PathBuf,
    /// Kubernetes manifests: namespaces, pods (with spec.nodeName and status.podIP), services, policies.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests"))]
    manifests: PathBuf,
    /// Where the lab keeps its state, logs, CA and configuration.
    #[arg(long, default_value = runner::DEFAULT_DIR)]
    dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    if let Some(result) = component::run_role_if_asked() {
        return result;
    }
    match Command::parse() {
        Command::Up { files, exit_after_demo } => {
            let options = Options {
                topology: files.topology,
                manifests: files.manifests,
                dir: files.dir,
                names: Names {
                    prefix: runner::DEFAULT_PREFIX.into(),
                },
            };
            println!("Bringing the lab up (state and logs in {})…", options.dir.display());
            let mut lab = Lab::up(&options)?;
            let shown = demo::run(&lab);
            match &shown {
                Ok(text) => println!("{text}"),
                Err(error) => eprintln!("demo failed: {error:#}"),
            }
            if shown.is_ok() && !exit_after_demo {
                println!("== The lab stays up. Look around, e.g.:");
                println!("  sudo ip netns exec mlab-pod-demo-client bash      # a shell in the client pod");
                println!("  sudo ip netns exec mlab-node-1 nft list ruleset   # nothing here: rules live in pods");
                println!("  sudo ip netns exec mlab-pod-demo-client nft list table inet ztunnel");
                println!("  less {}/logs/ztunnel-node-2.log", options.dir.display());
                println!(
                    "  less {}/logs/cni.log   # each mesh-cni ADD and DEL the lab ran",
                    options.dir.display()
                );
                println!(
                    "  sudo waypoint apply -n demo --enroll-namespace --config-dir {}/config",
                    options.dir.display()
                );
                println!("    # a waypoint for namespace demo: the lab deploys it, traffic goes through it");
                println!("Press Ctrl-C to stop and clean up.");
                wait_for_signal(&mut lab)?;
            }
            println!("Cleaning up…");
            lab.down()?;
            println!("Done: no namespace, rule or process of the lab is left.");
            shown.map(drop)
        }
        Command::Down { dir } => {
            runner::require_root()?;
            let names = Names {
                prefix: runner::DEFAULT_PREFIX.into(),
            };
            let removed = runner::down(&dir, &names)?;
            if removed.is_empty() {
                println!("Nothing to remove.");
            }
            for item in removed {
                println!("removed {item}");
            }
            Ok(())
        }
    }
}

/// Blocks until SIGINT or SIGTERM, deploying and removing waypoints as Gateways come and go.
fn wait_for_signal(lab: &mut Lab) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                result = tokio::signal::ctrl_c() => return result,
                _ = terminate.recv() => return Ok(()),
                () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {
                    match lab.reconcile_waypoints() {
                        Ok(changes) => changes.iter().for_each(|c| println!("{c}")),
                        Err(error) => eprintln!("waypoints: {error:#}"),
                    }
                }
            }
        }
    })?;
    Ok(())
}
