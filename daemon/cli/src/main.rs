//! `cairnctl`: the command line for a node's cairnd. Parses a command, makes
//! one API call over the Unix socket, prints a table or JSON. Any failure is
//! one line on stderr, `error: <what to do>`, and exit code 1.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use cairn_api::client::{connect, DEFAULT_SOCKET};
use cairn_api::pb;
use cairn_api::size::{parse_size, HumanSize};

/// Manage Cairn volumes on this node.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// cairnd's API socket.
    #[arg(long, global = true, env = "CAIRN_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, attach, inspect and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Act on one replica of a volume.
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// This node and the cluster's nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Daemon settings.
    #[command(subcommand)]
    Setting(SettingCmd),
    /// Point-in-time snapshots of a volume.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Backups in the backup target (Longhorn's backupstore format).
    #[command(subcommand)]
    Backup(BackupCmd),
}

#[derive(Debug, Subcommand)]
enum BackupCmd {
    /// Back up a snapshot (a new one when --snapshot is not given); returns
    /// when the backup is complete.
    Create {
        volume: String,
        #[arg(long)]
        snapshot: Option<String>,
        /// A label, key=value; repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Print the backup's handle as soon as it started; follow it with
        /// `backup get HANDLE` (in-progress, then completed or error).
        #[arg(long)]
        no_wait: bool,
    },
    /// Backups of one volume, or of every volume in the target.
    List { volume: Option<String> },
    /// One backup: bak://VOLUME/BACKUP (bs:// accepted).
    Get { handle: String },
    /// Delete a backup and the blocks no other backup uses.
    Delete { handle: String },
}

/// `key=value`, for `--label`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} must look like key=value")),
    }
}

#[derive(Debug, Subcommand)]
enum SnapshotCmd {
    /// Snapshot the volume now (every healthy replica at the same point).
    Create {
        volume: String,
        /// Snapshot name (DNS label); generated when omitted.
        #[arg(long)]
        name: Option<String>,
        /// A label, key=value; repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// The chain from the oldest snapshot to the volume head.
    List { volume: String },
    /// Remove a snapshot: marked removed, its data merged into the next
    /// snapshot when there is one.
    Delete { volume: String, name: String },
    /// Revert a detached volume to a snapshot (newer snapshots are dropped).
    Revert { volume: String, name: String },
    /// Merge removed and system snapshots into their successors.
    Purge { volume: String },
}

#[derive(Debug, Subcommand)]
enum SettingCmd {
    /// Every setting with its value and default.
    List,
    /// One setting's value.
    Get { name: String },
    /// Change a setting (validated; a bad value changes nothing).
    Set { name: String, value: String },
}

#[derive(Debug, Subcommand)]
enum VolumeCmd {
    /// Create a volume (detached).
    Create {
        /// Volume name: a DNS-1123 label (lower-case letters, digits, '-').
        name: String,
        /// Size, e.g. 10GiB or 512MiB; a multiple of 4KiB. With
        /// --from-backup, --from-snapshot or --from-volume it defaults to
        /// the source's size.
        #[arg(
            long,
            value_parser = parse_size,
            required_unless_present_any = ["from_backup", "from_snapshot", "from_volume"]
        )]
        size: Option<u64>,
        /// Replicas: each on a different node in a cluster (hard
        /// anti-affinity), on a different disk on a standalone node.
        /// Default: up to 3 in a cluster; 1 on a one-disk node, else 2.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        replicas: Option<u32>,
        /// Restore a backup into the new volume: bak://VOLUME/BACKUP
        /// (Longhorn's bs:// accepted). With --standby: bak://VOLUME.
        #[arg(long)]
        from_backup: Option<String>,
        /// A disaster-recovery volume: follows the backup volume, restoring
        /// each new backup incrementally; cannot be attached until
        /// `volume activate`.
        #[arg(long, requires = "from_backup")]
        standby: bool,
        /// Recurring jobs, a JSON array in Longhorn's format.
        #[arg(long)]
        recurring_jobs: Option<String>,
        /// Copy a snapshot into the new volume: VOLUME/SNAPSHOT. The volume
        /// can be attached once the copy is complete (`volume get` shows it).
        #[arg(long, conflicts_with_all = ["from_backup", "from_volume"])]
        from_snapshot: Option<String>,
        /// Clone a volume: a snapshot of it is taken, then copied.
        #[arg(long, conflicts_with = "from_backup")]
        from_volume: Option<String>,
        /// Create it on this node (a cluster member's name): the node owns
        /// it first, and one replica goes there when that node has room.
        #[arg(long, conflicts_with_all = ["from_snapshot", "from_volume"])]
        node: Option<String>,
    },
    /// Turn a DR standby volume into a normal volume (restores the latest
    /// backup first).
    Activate { name: String },
    /// A volume's recurring jobs.
    #[command(subcommand)]
    Recurring(RecurringCmd),
    /// List volumes.
    List,
    /// Show a volume and its replicas.
    Get { name: String },
    /// Attach a volume as /dev/ublkbN and print the device path. The node
    /// that attaches becomes the volume's owner: its old owner hands it
    /// over (refused while the device is in use there).
    Attach {
        name: String,
        /// The node to attach on (default: the node asked).
        #[arg(long)]
        node: Option<String>,
        /// Take the volume over when its owner does not answer: from the
        /// replicas that do. Writes the old owner acknowledged while cut off
        /// from all of them are lost.
        #[arg(long)]
        force: bool,
    },
    /// Remove a volume's device (data is kept).
    Detach { name: String },
    /// Grow a detached volume: every replica, then the volume.
    Expand {
        name: String,
        /// The new size, e.g. 20GiB: larger than now, a multiple of 4KiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume and its replicas' data.
    Delete {
        name: String,
        /// Detach first if attached.
        #[arg(long)]
        force: bool,
    },
    /// Recreate a lost volume record from its replicas on the cluster's
    /// nodes (this node becomes the owner).
    Adopt { name: String },
}

#[derive(Debug, Subcommand)]
enum RecurringCmd {
    /// Replace the volume's recurring jobs (`--jobs '[]'` removes them).
    Set {
        volume: String,
        /// JSON array: [{"name":"daily","task":"backup","cron":"0 2 * * *","retain":7,"labels":{}}]
        #[arg(long)]
        jobs: String,
    },
    /// Show the volume's recurring jobs.
    Get { volume: String },
}

#[derive(Debug, Subcommand)]
enum ReplicaCmd {
    /// Take a replica out of service (it is not used again).
    Fail { volume: String, replica: String },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// Show this node's disks and ublk status.
    Get,
    /// Every node of the cluster with its disks: size, allocated, used,
    /// schedulable.
    List,
    /// Add a peer by its replica address (HOST:PORT of its --replica-listen).
    Add { addr: String },
    /// Remove a peer, by node name or address.
    Remove { node: String },
    /// Whether new replicas may be placed on this node, and which of its
    /// disks refuse them. Replicas already there stay and keep serving.
    /// Without options: shows the rule; what is not given is kept.
    Scheduling {
        /// `false`: this node takes no new replicas; `true`: it does again.
        #[arg(long, action = clap::ArgAction::Set)]
        allow: Option<bool>,
        /// A disk (its path) that takes no new replicas; repeat for each.
        /// Replaces the list: disks not named take replicas again.
        #[arg(long = "unschedulable-disk", value_name = "PATH")]
        unschedulable_disks: Vec<String>,
        /// Every disk takes new replicas again (clears the list).
        #[arg(long, conflicts_with = "unschedulable_disks")]
        all_disks: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help / --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&one_line(&e.render().to_string())),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match rt.block_on(run(cli)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(msg) => fail(&msg),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::FAILURE
}

/// Folds clap's multi-line usage error into one line: the lines before the
/// usage hint, without clap's own `error:` prefix and tips.
fn one_line(rendered: &str) -> String {
    let mut parts = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if line.is_empty() || line.starts_with("tip:") {
            continue;
        }
        parts.push(line.strip_prefix("error:").unwrap_or(line).trim());
    }
    parts.join(" ")
}

/// Runs the command; returns what to print on stdout, or the error message.
async fn run(cli: Cli) -> Result<String, String> {
    let mut client = connect(&cli.socket).await.map_err(|e| e.to_string())?;
    let json = cli.output == Output::Json;
    let msg = |s: tonic::Status| s.message().to_string();
    // Every volume command answers with the volume: JSON, or its text form.
    let show = |v: &pb::Volume, text: fn(&pb::Volume) -> String| {
        if json {
            to_json(&volume_json(v))
        } else {
            text(v)
        }
    };
    match cli.command {
        Command::Volume(cmd) => match cmd {
            VolumeCmd::Create {
                name,
                size,
                replicas,
                from_backup,
                standby,
                recurring_jobs,
                from_snapshot,
                from_volume,
                node,
            } => {
                let req = pb::CreateVolumeRequest {
                    name,
                    size: size.unwrap_or(0),
                    replicas: replicas.unwrap_or(0),
                    from_backup: from_backup.unwrap_or_default(),
                    standby,
                    recurring_jobs: recurring_jobs.unwrap_or_default(),
                    from_snapshot: from_snapshot.unwrap_or_default(),
                    from_volume: from_volume.unwrap_or_default(),
                    node: node.unwrap_or_default(),
                };
                let v = client.create_volume(req).await.map_err(msg)?.into_inner();
                Ok(show(&v, volume_table))
            }
            VolumeCmd::List => {
                let vs = client
                    .list_volumes(pb::ListVolumesRequest {})
                    .await
                    .map_err(msg)?
                    .into_inner()
                    .volumes;
                Ok(if json {
                    to_json(&serde_json::Value::Array(
                        vs.iter().map(volume_json).collect(),
                    ))
                } else {
                    list_table(&vs)
                })
            }
            VolumeCmd::Get { name } => {
                let v = client
                    .get_volume(pb::VolumeRef { name })
                    .await
                    .map_err(msg)?
                    .into_inner();
                Ok(show(&v, volume_table))
            }
            VolumeCmd::Attach { name, node, force } => {
                let v = client
                    .attach_volume(pb::AttachVolumeRequest {
                        name,
                        node: node.unwrap_or_default(),
                        force,
                    })
                    .await
                    .map_err(msg)?
                    .into_inner();
                // Just the path, so `DEV=$(cairnctl volume attach v)` works.
                Ok(show(&v, |v| format!("{}\n", v.device)))
            }
            VolumeCmd::Detach { name } => {
                let v = client
                    .detach_volume(pb::VolumeRef { name })
                    .await
                    .map_err(msg)?
                    .into_inner();
                Ok(show(&v, |v| format!("volume {} detached\n", v.name)))
            }
            VolumeCmd::Expand { name, size } => {
                let v = client
                    .expand_volume(pb::ExpandVolumeRequest { name, size })
                    .await
                    .map_err(msg)?
                    .into_inner();
                Ok(show(&v, |v| {
                    format!("volume {} expanded to {}\n", v.name, HumanSize(v.size))
                }))
            }
            VolumeCmd::Delete { name, force } => {
                client
                    .delete_volume(pb::DeleteVolumeRequest {
                        name: name.clone(),
                        force,
                    })
                    .await
                    .map_err(msg)?;
                Ok(if json {
                    to_json(&json!({ "deleted": name }))
                } else {
                    format!("volume {name} deleted\n")
                })
            }
            VolumeCmd::Activate { name } => {
                let v = client
                    .activate_volume(pb::VolumeRef { name })
                    .await
                    .map_err(msg)?
                    .into_inner();
                Ok(show(&v, volume_table))
            }
            VolumeCmd::Recurring(RecurringCmd::Set { volume, jobs }) => {
                let v = client
                    .set_recurring_jobs(pb::SetRecurringJobsRequest { volume, jobs })
                    .await
                    .map_err(msg)?
                    .into_inner();
                Ok(show(&v, |v| {
                    format!(
                        "volume {}: recurring jobs {}\n",
                        v.name,
                        if v.recurring_jobs.is_empty() {
                            "[]"
                        } else {
                            &v.recurring_jobs
                        }
                    )
                }))
            }
            VolumeCmd::Recurring(RecurringCmd::Get { volume }) => {
                let v = client
                    .get_volume(pb::VolumeRef { name: volume })
                    .await
                    .map_err(msg)?
                    .into_inner();
                Ok(format!(
                    "{}\n",
                    if v.recurring_jobs.is_empty() {
                        "[]"
                    } else {
                        &v.recurring_jobs
                    }
                ))
            }
            VolumeCmd::Adopt { name } => {
                let v = client
                    .adopt_volume(pb::VolumeRef { name })
                    .await
                    .map_err(msg)?
                    .into_inner();
                Ok(show(&v, volume_table))
            }
        },
        Command::Replica(ReplicaCmd::Fail { volume, replica }) => {
            let v = client
                .fail_replica(pb::FailReplicaRequest { volume, replica })
                .await
                .map_err(msg)?
                .into_inner();
            Ok(show(&v, volume_table))
        }
        Command::Node(NodeCmd::List) => {
            let nodes = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(msg)?
                .into_inner()
                .nodes;
            Ok(if json {
                to_json(&serde_json::Value::Array(
                    nodes.iter().map(cluster_node_json).collect(),
                ))
            } else {
                nodes_table(&nodes)
            })
        }
        Command::Node(NodeCmd::Add { addr }) => {
            let n = client
                .add_node(pb::AddNodeRequest { addr })
                .await
                .map_err(msg)?
                .into_inner();
            Ok(if json {
                to_json(&cluster_node_json(&n))
            } else {
                nodes_table(std::slice::from_ref(&n))
            })
        }
        Command::Node(NodeCmd::Remove { node }) => {
            client
                .remove_node(pb::RemoveNodeRequest { node: node.clone() })
                .await
                .map_err(msg)?;
            Ok(if json {
                to_json(&json!({ "removed": node }))
            } else {
                format!("node {node} removed\n")
            })
        }
        Command::Setting(cmd) => {
            let settings = match cmd {
                SettingCmd::List => {
                    client
                        .list_settings(pb::ListSettingsRequest {})
                        .await
                        .map_err(msg)?
                        .into_inner()
                        .settings
                }
                SettingCmd::Get { name } => vec![client
                    .get_setting(pb::SettingRef { name })
                    .await
                    .map_err(msg)?
                    .into_inner()],
                SettingCmd::Set { name, value } => {
                    vec![client
                        .set_setting(pb::SetSettingRequest { name, value })
                        .await
                        .map_err(msg)?
                        .into_inner()]
                }
            };
            Ok(if json {
                let list: Vec<_> = settings
                    .iter()
                    .map(|s| json!({ "name": s.name, "value": s.value, "default": s.default_value, "description": s.description }))
                    .collect();
                to_json(&serde_json::Value::Array(list))
            } else {
                let mut rows = vec![row(&["NAME", "VALUE", "DEFAULT", "DESCRIPTION"])];
                for s in &settings {
                    rows.push(vec![
                        s.name.clone(),
                        s.value.clone(),
                        s.default_value.clone(),
                        s.description.clone(),
                    ]);
                }
                table(&rows)
            })
        }
        Command::Snapshot(cmd) => snapshot_cmd(&mut client, cmd, json).await,
        Command::Backup(cmd) => backup_cmd(&mut client, cmd, json).await,
        Command::Node(NodeCmd::Scheduling {
            allow,
            unschedulable_disks,
            all_disks,
        }) => {
            let now = client
                .get_node(pb::GetNodeRequest {})
                .await
                .map_err(msg)?
                .into_inner();
            let n = if allow.is_none() && unschedulable_disks.is_empty() && !all_disks {
                now
            } else {
                let disks = if all_disks {
                    Vec::new()
                } else if unschedulable_disks.is_empty() {
                    now.unschedulable_disks
                } else {
                    unschedulable_disks
                };
                client
                    .set_node_scheduling(pb::SetNodeSchedulingRequest {
                        allow_scheduling: allow.unwrap_or(now.allow_scheduling),
                        unschedulable_disks: disks,
                    })
                    .await
                    .map_err(msg)?
                    .into_inner()
            };
            Ok(if json {
                to_json(&node_json(&n))
            } else {
                node_table(&n)
            })
        }
        Command::Node(NodeCmd::Get) => {
            let n = client
                .get_node(pb::GetNodeRequest {})
                .await
                .map_err(msg)?
                .into_inner();
            Ok(if json {
                to_json(&node_json(&n))
            } else {
                node_table(&n)
            })
        }
    }
}

type Client = pb::cairn_client::CairnClient<tonic::transport::Channel>;

async fn snapshot_cmd(client: &mut Client, cmd: SnapshotCmd, json: bool) -> Result<String, String> {
    let msg = |s: tonic::Status| s.message().to_string();
    match cmd {
        SnapshotCmd::Create {
            volume,
            name,
            labels,
        } => {
            let req = pb::CreateSnapshotRequest {
                volume,
                name: name.unwrap_or_default(),
                labels: labels.into_iter().collect(),
            };
            let s = client.create_snapshot(req).await.map_err(msg)?.into_inner();
            Ok(if json {
                to_json(&snapshot_json(&s))
            } else {
                format!("snapshot {} taken\n", s.name)
            })
        }
        SnapshotCmd::List { volume } => {
            let list = client
                .list_snapshots(pb::VolumeRef { name: volume })
                .await
                .map_err(msg)?
                .into_inner()
                .snapshots;
            if json {
                return Ok(to_json(&serde_json::Value::Array(
                    list.iter().map(snapshot_json).collect(),
                )));
            }
            let mut rows = vec![row(&[
                "NAME", "PARENT", "CREATED", "SIZE", "USER", "REMOVED", "LABELS",
            ])];
            for s in &list {
                let labels: Vec<String> =
                    s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                rows.push(vec![
                    s.name.clone(),
                    if s.parent.is_empty() {
                        "-".into()
                    } else {
                        s.parent.clone()
                    },
                    if s.is_head {
                        "-".into()
                    } else {
                        s.created.clone()
                    },
                    HumanSize(s.size).to_string(),
                    if s.is_head {
                        "-".into()
                    } else {
                        s.user_created.to_string()
                    },
                    s.removed.to_string(),
                    if labels.is_empty() {
                        "-".into()
                    } else {
                        labels.join(",")
                    },
                ]);
            }
            Ok(table(&rows))
        }
        SnapshotCmd::Delete { volume, name } => {
            let r = client
                .delete_snapshot(pb::SnapshotRef {
                    volume,
                    name: name.clone(),
                })
                .await
                .map_err(msg)?
                .into_inner();
            Ok(if json {
                to_json(&json!({ "deleted": name, "coalesced": r.coalesced }))
            } else if r.coalesced {
                format!("snapshot {name} deleted (data merged into the next snapshot)\n")
            } else {
                format!("snapshot {name} marked removed (merged once a newer snapshot exists: `snapshot purge`)\n")
            })
        }
        SnapshotCmd::Revert { volume, name } => {
            let r = client
                .revert_snapshot(pb::SnapshotRef {
                    volume: volume.clone(),
                    name: name.clone(),
                })
                .await
                .map_err(msg)?
                .into_inner();
            Ok(if json {
                to_json(&json!({ "reverted": volume, "snapshot": name, "dropped": r.dropped }))
            } else if r.dropped.is_empty() {
                format!("volume {volume} reverted to {name}\n")
            } else {
                format!(
                    "volume {volume} reverted to {name}; dropped newer snapshots: {}\n",
                    r.dropped.join(", ")
                )
            })
        }
        SnapshotCmd::Purge { volume } => {
            let r = client
                .purge_snapshots(pb::VolumeRef {
                    name: volume.clone(),
                })
                .await
                .map_err(msg)?
                .into_inner();
            Ok(if json {
                to_json(&json!({ "purged": volume, "merged": r.merged }))
            } else {
                format!(
                    "volume {volume}: {} snapshot(s) merged{}\n",
                    r.merged.len(),
                    if r.merged.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.merged.join(", "))
                    }
                )
            })
        }
    }
}

async fn backup_cmd(client: &mut Client, cmd: BackupCmd, json: bool) -> Result<String, String> {
    let msg = |s: tonic::Status| s.message().to_string();
    match cmd {
        BackupCmd::Create {
            volume,
            snapshot,
            labels,
            no_wait,
        } => {
            let req = pb::CreateBackupRequest {
                volume,
                snapshot: snapshot.unwrap_or_default(),
                labels: labels.into_iter().collect(),
                no_wait,
            };
            let b = client.create_backup(req).await.map_err(msg)?.into_inner();
            Ok(if json {
                to_json(&backup_json(&b))
            } else if no_wait {
                format!(
                    "backup {} started from snapshot {}: follow it with `cairnctl backup get {}`\n",
                    b.handle, b.snapshot, b.handle
                )
            } else {
                format!(
                    "backup {} complete: {} of {} blocks uploaded ({}), {} already in the target\n",
                    b.handle,
                    b.uploaded_blocks,
                    b.total_blocks,
                    HumanSize(b.uploaded_bytes),
                    b.existing_blocks
                )
            })
        }
        BackupCmd::List { volume } => {
            let list = client
                .list_backups(pb::ListBackupsRequest {
                    volume: volume.unwrap_or_default(),
                })
                .await
                .map_err(msg)?
                .into_inner()
                .backups;
            Ok(if json {
                to_json(&serde_json::Value::Array(
                    list.iter().map(backup_json).collect(),
                ))
            } else {
                backups_table(&list)
            })
        }
        BackupCmd::Get { handle } => {
            let b = client
                .get_backup(pb::BackupRef { handle })
                .await
                .map_err(msg)?
                .into_inner();
            Ok(if json {
                to_json(&backup_json(&b))
            } else {
                backups_table(std::slice::from_ref(&b))
            })
        }
        BackupCmd::Delete { handle } => {
            let r = client
                .delete_backup(pb::BackupRef {
                    handle: handle.clone(),
                })
                .await
                .map_err(msg)?
                .into_inner();
            Ok(if json {
                to_json(
                    &json!({ "deleted": handle, "removedBlocks": r.removed_blocks, "keptBlocks": r.kept_blocks }),
                )
            } else {
                format!(
                    "backup {handle} deleted: {} block(s) removed, {} kept\n",
                    r.removed_blocks, r.kept_blocks
                )
            })
        }
    }
}

fn backups_table(list: &[pb::Backup]) -> String {
    let mut rows = vec![row(&[
        "HANDLE", "SNAPSHOT", "CREATED", "SIZE", "STATE", "PROGRESS", "LABELS",
    ])];
    for b in list {
        let labels: Vec<String> = b.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rows.push(vec![
            b.handle.clone(),
            b.snapshot.clone(),
            if b.created.is_empty() {
                "-".into()
            } else {
                b.created.clone()
            },
            HumanSize(b.size).to_string(),
            backup_state(b).to_string(),
            match &b.progress {
                Some(p) => format!("{}% {}/s", p.percent, HumanSize(p.bytes_per_second)),
                None => "-".into(),
            },
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(",")
            },
        ]);
    }
    table(&rows)
}

fn backup_json(b: &pb::Backup) -> serde_json::Value {
    json!({
        "name": b.name, "volume": b.volume, "handle": b.handle, "snapshot": b.snapshot,
        "snapshotCreated": b.snapshot_created, "created": b.created, "size": b.size, "labels": b.labels,
        "state": backup_state(b), "message": b.message, "incremental": b.incremental, "compression": b.compression,
        "uploadedBlocks": b.uploaded_blocks, "existingBlocks": b.existing_blocks, "totalBlocks": b.total_blocks,
        "uploadedBytes": b.uploaded_bytes,
        "progress": b.progress.as_ref().map(|p| json!({"percent": p.percent, "doneBytes": p.done_bytes, "totalBytes": p.total_bytes, "bytesPerSecond": p.bytes_per_second})),
    })
}

fn snapshot_json(s: &pb::Snapshot) -> serde_json::Value {
    json!({
        "name": s.name, "parent": s.parent, "created": s.created, "size": s.size,
        "userCreated": s.user_created, "removed": s.removed, "isHead": s.is_head, "labels": s.labels,
    })
}

fn to_json(v: &serde_json::Value) -> String {
    // Serializing a Value cannot fail; fall back to compact just in case.
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s
}

fn volume_json(v: &pb::Volume) -> serde_json::Value {
    json!({
        "name": v.name,
        "owner": v.owner,
        "state": volume_state(v),
        "size": v.size,
        "device": v.device,
        "replicas": v.replicas.iter().map(|r| json!({
            "name": r.name,
            "node": r.node,
            "addr": r.addr,
            "disk": r.disk,
            "dir": r.dir,
            "state": replica_state(r),
            "message": r.message,
            "last_rebuild": r.last_rebuild.as_ref().map(|l| json!({
                "incremental": l.incremental,
                "copied_bytes": l.copied_bytes,
                "millis": l.millis,
                "finished_at": l.finished_at,
            })),
            "rebuild": r.rebuild.as_ref().map(|b| json!({
                "percent": b.percent,
                "done_bytes": b.done_bytes,
                "total_bytes": b.total_bytes,
                "bytes_per_second": b.bytes_per_second,
                "incremental": b.incremental,
            })),
        })).collect::<Vec<_>>(),
        "revision": v.revision,
        "queues": v.queues,
        "queue_depth": v.queue_depth,
        "message": v.message,
        "standby": v.standby,
        "from_backup": v.from_backup,
        "last_restored": v.last_restored,
        "last_backup": v.last_backup,
        "recurring_jobs": v.recurring_jobs,
        "restore": v.restore.as_ref().map(|p| json!({
            "percent": p.percent, "done_bytes": p.done_bytes, "total_bytes": p.total_bytes, "bytes_per_second": p.bytes_per_second,
        })),
    })
}

fn node_json(n: &pb::Node) -> serde_json::Value {
    json!({
        "name": n.name,
        "ublk_status": n.ublk_status,
        "kernel": n.kernel,
        "online_expansion": n.online_expansion,
        "ublk_features": n.ublk_features,
        "allow_scheduling": n.allow_scheduling,
        "unschedulable_disks": n.unschedulable_disks,
        "disks": n.disks.iter().map(|d| json!({
            "path": d.path,
            "size": d.size,
            "available": d.available,
            "replicas": d.replicas,
            "schedulable": d.schedulable,
        })).collect::<Vec<_>>(),
    })
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn healthy_of(v: &pb::Volume) -> String {
    let healthy = v
        .replicas
        .iter()
        .filter(|r| r.state() == pb::ReplicaState::Healthy)
        .count();
    format!("{healthy}/{}", v.replicas.len())
}

fn list_table(vs: &[pb::Volume]) -> String {
    let mut rows = vec![row(&[
        "NAME", "STATE", "SIZE", "REPLICAS", "DEVICE", "OWNER",
    ])];
    for v in vs {
        rows.push(vec![
            v.name.clone(),
            volume_state(v).to_string(),
            HumanSize(v.size).to_string(),
            healthy_of(v),
            or_dash(&v.device).to_string(),
            or_dash(&v.owner).to_string(),
        ]);
    }
    table(&rows)
}

fn volume_table(v: &pb::Volume) -> String {
    let mut out = list_table(std::slice::from_ref(v));
    if !v.message.is_empty() {
        let _ = writeln!(out, "message: {}", v.message);
    }
    if v.standby {
        let _ = writeln!(
            out,
            "standby: follows {} (last restored: {})",
            v.from_backup,
            or_dash(&v.last_restored)
        );
    } else if !v.from_backup.is_empty() {
        let _ = writeln!(out, "restored from: {}", v.from_backup);
    }
    if let Some(p) = &v.restore {
        let _ = writeln!(
            out,
            "restoring: {}% {}/{} {}/s",
            p.percent,
            approx_size(p.done_bytes),
            approx_size(p.total_bytes),
            approx_size(p.bytes_per_second)
        );
    }
    if !v.last_backup.is_empty() {
        let _ = writeln!(out, "last backup: bak://{}/{}", v.name, v.last_backup);
    }
    if !v.recurring_jobs.is_empty() {
        let _ = writeln!(out, "recurring jobs: {}", v.recurring_jobs);
    }
    out.push('\n');
    let mut rows = vec![row(&[
        "REPLICA", "NODE", "DISK", "STATE", "REBUILD", "MESSAGE",
    ])];
    for r in &v.replicas {
        let rebuild = match &r.rebuild {
            Some(b) => format!(
                "{}% {}/{} {}/s{}",
                b.percent,
                approx_size(b.done_bytes),
                approx_size(b.total_bytes),
                approx_size(b.bytes_per_second),
                if b.incremental {
                    " (changed blocks)"
                } else {
                    " (full)"
                }
            ),
            None => "-".to_string(),
        };
        rows.push(vec![
            r.name.clone(),
            r.node.clone(),
            r.disk.clone(),
            replica_state(r).to_string(),
            rebuild,
            or_dash(&r.message).to_string(),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

fn node_table(n: &pb::Node) -> String {
    let mut out = format!(
        "node: {}\nkernel: {}\nublk: {}\nonline expansion: {}\nnew replicas: {}\n\n",
        n.name,
        n.kernel,
        if n.ublk_status.is_empty() {
            "available"
        } else {
            &n.ublk_status
        },
        if n.online_expansion {
            "the ublk driver resizes live devices (UPDATE_SIZE)"
        } else {
            "not on this kernel (needs Linux 6.16+ with UBLK_F_UPDATE_SIZE)"
        },
        if n.allow_scheduling {
            "allowed"
        } else {
            "not scheduled here (`node scheduling --allow true` to allow)"
        }
    );
    let mut rows = vec![row(&[
        "DISK",
        "SIZE",
        "AVAILABLE",
        "REPLICAS",
        "SCHEDULABLE",
    ])];
    for d in &n.disks {
        rows.push(vec![
            d.path.clone(),
            approx_size(d.size),
            approx_size(d.available),
            d.replicas.to_string(),
            d.schedulable.to_string(),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

fn cluster_node_json(n: &pb::ClusterNode) -> serde_json::Value {
    json!({
        "name": n.name,
        "addr": n.addr,
        "local": n.local,
        "up": n.state() == pb::NodeState::Up,
        "message": n.message,
        "disks": n.disks.iter().map(|d| json!({
            "path": d.path,
            "size": d.size,
            "available": d.available,
            "used": d.size.saturating_sub(d.available),
            "allocated": d.allocated,
            "replicas": d.replicas,
            "schedulable": d.schedulable,
        })).collect::<Vec<_>>(),
    })
}

/// Longhorn's node columns: Size, Allocated (promised), Used.
fn nodes_table(nodes: &[pb::ClusterNode]) -> String {
    let mut rows = vec![row(&[
        "NODE",
        "ADDRESS",
        "STATE",
        "DISK",
        "SIZE",
        "ALLOCATED",
        "USED",
        "REPLICAS",
        "SCHEDULABLE",
    ])];
    for n in nodes {
        let state = if n.state() == pb::NodeState::Up {
            "up"
        } else {
            "down"
        };
        let name = if n.local {
            format!("{} (this node)", n.name)
        } else {
            n.name.clone()
        };
        if n.disks.is_empty() {
            rows.push(vec![
                name,
                or_dash(&n.addr).to_string(),
                state.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "no".into(),
            ]);
            continue;
        }
        for d in &n.disks {
            rows.push(vec![
                name.clone(),
                or_dash(&n.addr).to_string(),
                state.to_string(),
                d.path.clone(),
                approx_size(d.size),
                approx_size(d.allocated),
                approx_size(d.size.saturating_sub(d.available)),
                d.replicas.to_string(),
                if d.schedulable { "yes" } else { "no" }.to_string(),
            ]);
        }
    }
    table(&rows)
}

/// Disk sizes are not round numbers: one decimal in the largest unit fits.
fn approx_size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    match UNITS.iter().find(|(_, u)| n >= *u) {
        Some((name, unit)) => format!("{:.1}{name}", n as f64 / *unit as f64),
        None => HumanSize(n).to_string(),
    }
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Left-aligned columns separated by two spaces; the last column is not
/// padded, so lines carry no trailing blanks.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The words `cairnctl` prints for the API's state enums (the same in the
/// table and in JSON, which scripts match on).
fn volume_state(v: &pb::Volume) -> &'static str {
    match v.state() {
        pb::VolumeState::Detached => "detached",
        pb::VolumeState::Healthy => "healthy",
        pb::VolumeState::Degraded => "degraded",
        pb::VolumeState::Faulted => "faulted",
        pb::VolumeState::Fenced => "fenced",
        pb::VolumeState::Unspecified => "unknown",
    }
}

fn replica_state(r: &pb::Replica) -> &'static str {
    match r.state() {
        pb::ReplicaState::Healthy => "healthy",
        pb::ReplicaState::Rebuilding => "rebuilding",
        pb::ReplicaState::Failed => "failed",
        pb::ReplicaState::Unspecified => "unknown",
    }
}

fn backup_state(b: &pb::Backup) -> &'static str {
    match b.state() {
        pb::BackupState::InProgress => "in-progress",
        pb::BackupState::Completed => "completed",
        pb::BackupState::Error => "error",
        pb::BackupState::Unspecified => "unknown",
    }
}
