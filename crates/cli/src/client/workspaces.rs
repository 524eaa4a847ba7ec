//! `agentvm workspaces create|list|show|rm|checkpoint|checkpoints|restore|fork|diff|patch|apply|verify`.

use std::path::PathBuf;
use std::process::ExitCode;

use agentvm_proto::api::{
    CheckpointPage, CheckpointRequest, CheckpointView, Verified, WorkspacePage, WorkspaceRequest,
    WorkspaceView,
};
use clap::Subcommand;
use reqwest::Method;
use serde_json::json;

use super::{ago, api_path, finish, print_json, rt, Client, Conn};

#[derive(Subcommand, Debug)]
pub enum WorkspacesCmd {
    /// Make a workspace over a repository (inside the server's allowed roots).
    Create {
        name: String,
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The image its jobs and sessions run on unless they name their
        /// own (a tag or digest of the server's store).
        #[arg(long, value_name = "NAME")]
        image: Option<String>,
    },
    /// List your workspaces, oldest first.
    List,
    /// Show one workspace (id or name).
    Show { workspace: String },
    /// Delete a workspace and its checkpoints, or with --checkpoint only
    /// that checkpoint (forks keep what they need either way).
    Rm {
        workspace: String,
        /// Delete only this checkpoint (id or name) of the workspace.
        #[arg(long, value_name = "CHECKPOINT")]
        checkpoint: Option<String>,
    },
    /// Take a checkpoint NAME of the workspace as it is now.
    Checkpoint { workspace: String, name: String },
    /// List a workspace's checkpoints, oldest first.
    Checkpoints { workspace: String },
    /// Put the workspace back to one of its checkpoints (id or name).
    Restore {
        workspace: String,
        checkpoint: String,
    },
    /// Make workspace NAME from a checkpoint (id or name) of WORKSPACE.
    Fork {
        workspace: String,
        checkpoint: String,
        name: String,
    },
    /// Print (or save) everything the workspace changed against its repository.
    Patch {
        workspace: String,
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Print (or save) what changed between two checkpoints, or a
    /// checkpoint and now, as a patch that turns the first into the second.
    Diff {
        workspace: String,
        /// A checkpoint (id or name); default: the repository as it is.
        #[arg(long, value_name = "CHECKPOINT")]
        from: Option<String>,
        /// A checkpoint (id or name); default: the workspace now.
        #[arg(long, value_name = "CHECKPOINT")]
        to: Option<String>,
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Put the workspace's patch on a new branch agentvm/<id> of its repository.
    Apply { workspace: String },
    /// Check every layer of the workspace and of its checkpoints against
    /// their manifests; exit 1, naming each damaged file, if any differs.
    Verify { workspace: String },
}

pub fn workspaces(conn: Conn, cmd: WorkspacesCmd) -> ExitCode {
    finish((|| {
        let c = Client::new(&conn)?;
        rt()?.block_on(inner(&c, cmd))
    })())
}

fn show(c: &Client, w: &WorkspaceView) {
    if c.json {
        print_json(w);
        return;
    }
    for (k, v) in [
        ("name", w.name.clone()),
        ("id", w.id.clone()),
        ("repo_path", w.repo_path.clone()),
        ("layers", w.layers.to_string()),
        ("bytes", w.bytes.to_string()),
        (
            "used",
            match w.quota_bytes {
                Some(q) => format!("{} of its quota of {q} bytes", w.used_bytes),
                None => format!("{} bytes (no quota)", w.used_bytes),
            },
        ),
        ("writer", w.writer.clone().unwrap_or_else(|| "-".into())),
        ("image", w.image.clone().unwrap_or_else(|| "-".into())),
        ("created", ago(Some(w.created_at))),
        ("updated", ago(Some(w.updated_at))),
    ] {
        println!("{k:<10} {v}");
    }
}

async fn checkpoint_id(c: &Client, ws: &str, which: &str) -> Result<String, String> {
    let page: CheckpointPage = c
        .get(&api_path(&["v1", "workspaces", ws, "checkpoints"], &[])?)
        .await?;
    page.checkpoints
        .iter()
        .find(|cp| cp.id == which || cp.name == which)
        .map(|cp| cp.id.clone())
        .ok_or_else(|| format!("workspace {ws} has no checkpoint {which}"))
}

async fn inner(c: &Client, cmd: WorkspacesCmd) -> Result<ExitCode, String> {
    let post = |path: String, body: serde_json::Value| c.req(Method::POST, &path).json(&body);
    match cmd {
        WorkspacesCmd::Create { name, repo, image } => {
            let repo = std::fs::canonicalize(&repo).unwrap_or(repo);
            let body = WorkspaceRequest {
                name,
                repo_path: Some(repo.to_string_lossy().into_owned()),
                from_checkpoint: None,
                image,
            };
            let w: WorkspaceView = c
                .call(
                    c.req(Method::POST, &api_path(&["v1", "workspaces"], &[])?)
                        .json(&body),
                )
                .await?;
            show(c, &w);
        }
        WorkspacesCmd::List => {
            let page: WorkspacePage = c.get(&api_path(&["v1", "workspaces"], &[])?).await?;
            if c.json {
                print_json(&page);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<20} {:<20} {:>6} {:>12} {:<10} REPO",
                "NAME", "ID", "LAYERS", "BYTES", "UPDATED"
            );
            for w in &page.workspaces {
                println!(
                    "{:<20} {:<20} {:>6} {:>12} {:<10} {}",
                    w.name,
                    w.id,
                    w.layers,
                    w.bytes,
                    ago(Some(w.updated_at)),
                    w.repo_path
                );
            }
        }
        WorkspacesCmd::Show { workspace } => {
            let w: WorkspaceView = c
                .get(&api_path(&["v1", "workspaces", &workspace], &[])?)
                .await?;
            show(c, &w);
        }
        WorkspacesCmd::Rm {
            workspace,
            checkpoint: Some(cp),
        } => {
            c.send(c.req(
                Method::DELETE,
                &api_path(&["v1", "workspaces", &workspace, "checkpoints", &cp], &[])?,
            ))
            .await?;
            if c.json {
                print_json(&json!({"workspace": workspace, "checkpoint": cp, "deleted": true}));
            } else {
                println!("checkpoint {cp} of {workspace} deleted");
            }
        }
        WorkspacesCmd::Rm {
            workspace,
            checkpoint: None,
        } => {
            c.send(c.req(
                Method::DELETE,
                &api_path(&["v1", "workspaces", &workspace], &[])?,
            ))
            .await?;
            if c.json {
                print_json(&json!({"workspace": workspace, "deleted": true}));
            } else {
                println!("{workspace} deleted");
            }
        }
        WorkspacesCmd::Checkpoint { workspace, name } => {
            let body = CheckpointRequest {
                name: Some(name),
                checkpoint: None,
            };
            let cp: CheckpointView = c
                .call(
                    c.req(
                        Method::POST,
                        &api_path(&["v1", "workspaces", &workspace, "checkpoints"], &[])?,
                    )
                    .json(&body),
                )
                .await?;
            if c.json {
                print_json(&cp);
            } else {
                println!(
                    "checkpoint {} ({}) of {workspace}: {} layers",
                    cp.name, cp.id, cp.layers
                );
            }
        }
        WorkspacesCmd::Checkpoints { workspace } => {
            let page: CheckpointPage = c
                .get(&api_path(
                    &["v1", "workspaces", &workspace, "checkpoints"],
                    &[],
                )?)
                .await?;
            if c.json {
                print_json(&page);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<20} {:<20} {:>6} {:>12} CREATED",
                "NAME", "ID", "LAYERS", "BYTES"
            );
            for cp in &page.checkpoints {
                println!(
                    "{:<20} {:<20} {:>6} {:>12} {}",
                    cp.name,
                    cp.id,
                    cp.layers,
                    cp.bytes,
                    ago(Some(cp.created_at))
                );
            }
        }
        WorkspacesCmd::Restore {
            workspace,
            checkpoint,
        } => {
            let w: WorkspaceView = c
                .call(post(
                    api_path(&["v1", "workspaces", &workspace, "restore"], &[])?,
                    json!({"checkpoint": checkpoint}),
                ))
                .await?;
            show(c, &w);
        }
        WorkspacesCmd::Fork {
            workspace,
            checkpoint,
            name,
        } => {
            let id = checkpoint_id(c, &workspace, &checkpoint).await?;
            let w: WorkspaceView = c
                .call(post(
                    api_path(&["v1", "workspaces"], &[])?,
                    json!({"name": name, "from_checkpoint": id}),
                ))
                .await?;
            show(c, &w);
        }
        WorkspacesCmd::Diff {
            workspace,
            from,
            to,
            output,
        } => {
            let mut q = Vec::new();
            if let Some(f) = &from {
                q.push(("from", f.as_str()));
            }
            if let Some(t) = &to {
                q.push(("to", t.as_str()));
            }
            return super::jobs::download_query(c, "workspaces", &workspace, "diff", &q, output)
                .await;
        }
        WorkspacesCmd::Patch { workspace, output } => {
            return super::jobs::download(c, "workspaces", &workspace, "patch", output).await;
        }
        WorkspacesCmd::Apply { workspace } => {
            return super::jobs::apply(c, "workspaces", &workspace).await;
        }
        WorkspacesCmd::Verify { workspace } => {
            let v: Verified = c
                .call(c.req(
                    Method::POST,
                    &api_path(&["v1", "workspaces", &workspace, "verify"], &[])?,
                ))
                .await?;
            if c.json {
                print_json(&v);
            } else if v.damaged.is_empty() {
                println!(
                    "{workspace}: {} layers checked, all as their manifests say",
                    v.layers
                );
            } else {
                for d in &v.damaged {
                    println!("damaged: layer {} at {}: {}", d.layer, d.path, d.why);
                }
            }
            if !v.damaged.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
