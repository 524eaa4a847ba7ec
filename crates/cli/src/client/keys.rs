//! `agentvm keys ...` and `agentvm audit`.

use std::process::ExitCode;

use agentvm_proto::api::{AuditEventView, AuditPage, KeyRequest, KeyView, NewKey};
use agentvm_proto::NetworkMode;
use clap::Subcommand;
use serde_json::json;

use super::{ago, api_path, finish, print_json, rt, Client, Conn};

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Create a key; its secret is printed once.
    Create {
        #[arg(long)]
        name: String,
        /// read, run or admin (repeatable).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// What this key's jobs may use beyond their profile's network
        /// policy: none, host or allow:HOST[:PORT],... (without it a
        /// key's jobs may only narrow their profile's).
        #[arg(long, value_name = "MODE", value_parser = NetworkMode::parse)]
        network: Option<NetworkMode>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key.
    Revoke { id: String },
}

pub fn audit(conn: Conn, limit: i64, job: Option<String>) -> ExitCode {
    finish((|| {
        let c = Client::new(&conn)?;
        rt()?.block_on(audit_inner(&c, limit, job))
    })())
}

/// Page through /v1/audit until `limit` events (of `job`, if given) are
/// collected or the trail ends.
async fn audit_inner(c: &Client, limit: i64, job: Option<String>) -> Result<ExitCode, String> {
    let mut out: Vec<AuditEventView> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = vec![("limit", "200")];
        if let Some(cur) = &cursor {
            q.push(("cursor", cur));
        }
        let path = api_path(&["v1", "audit"], &q)?;
        let page: AuditPage = c.get(&path).await?;
        for e in page.events {
            let of_job = job.as_deref().is_none_or(|id| {
                e.target.as_deref() == Some(id)
                    || e.detail
                        .as_deref()
                        .is_some_and(|d| d.starts_with(&format!("job {id};")))
            });
            if of_job && (out.len() as i64) < limit {
                out.push(e);
            }
        }
        cursor = page.next_cursor;
        if cursor.is_none() || out.len() as i64 >= limit {
            break;
        }
    }
    if c.json {
        print_json(&out);
        return Ok(ExitCode::SUCCESS);
    }
    for e in &out {
        println!(
            "{:<10} {:<12} {:<32} {:<28} {}",
            ago(Some(e.ts)),
            e.action,
            e.target.as_deref().unwrap_or("-"),
            e.outcome,
            e.detail.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn keys(conn: Conn, cmd: KeysCmd) -> ExitCode {
    finish((|| {
        let c = Client::new(&conn)?;
        rt()?.block_on(keys_inner(&c, cmd))
    })())
}

async fn keys_inner(c: &Client, cmd: KeysCmd) -> Result<ExitCode, String> {
    use reqwest::Method;
    match cmd {
        KeysCmd::Create {
            name,
            scopes,
            network,
        } => {
            let body = KeyRequest {
                name,
                scopes,
                network: network.map(|n| n.to_string()),
            };
            let k: NewKey = c.call(c.req(Method::POST, "/v1/keys").json(&body)).await?;
            if c.json {
                print_json(&k);
            } else {
                eprintln!(
                    "agentvm: created {} ({}); the secret below is shown once:",
                    k.id,
                    k.scopes.join(",")
                );
                println!("{}", k.key);
            }
        }
        KeysCmd::List => {
            let ks: Vec<KeyView> = c.get("/v1/keys").await?;
            if c.json {
                print_json(&ks);
            } else {
                println!(
                    "{:<18} {:<16} {:<10} {:<10} NAME",
                    "ID", "SCOPES", "SOURCE", "STATE"
                );
                for k in &ks {
                    println!(
                        "{:<18} {:<16} {:<10} {:<10} {}",
                        k.id,
                        k.scopes.join(","),
                        k.source,
                        if k.revoked_at.is_none() {
                            "active"
                        } else {
                            "revoked"
                        },
                        k.name
                    );
                }
            }
        }
        KeysCmd::Revoke { id } => {
            c.send(c.req(Method::DELETE, &api_path(&["v1", "keys", &id], &[])?))
                .await?;
            if c.json {
                print_json(&json!({"id": id, "revoked": true}));
            } else {
                println!("{id} revoked");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
