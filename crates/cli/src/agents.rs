//! `agentvm agents`: the agent profiles, and whether each one's CLI is
//! present in the sandbox's view (probed by running `CLI --version` in a
//! real sandbox with the profile's binds).

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use clap::Args;
use serde_json::json;

#[derive(Args, Debug)]
pub struct AgentsArgs {
    /// The server's config file (its [agents.NAME] profiles count too).
    #[arg(long, value_name = "FILE", env = "AGENTVM_CONFIG")]
    config: Option<PathBuf>,
    /// Probe the CLIs on this image (a tag or digest of the data
    /// directory's store) instead of each profile's own image or the
    /// host's system: which agents the image provides.
    #[arg(long, value_name = "NAME")]
    image: Option<String>,
    /// The data directory whose image store --image names from.
    #[arg(long, value_name = "DIR", env = "AGENTVM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// Where the probe's sandbox runs: an image (and its store), or the host.
struct On<'a> {
    image: Option<&'a str>,
    data_dir: Option<&'a std::path::Path>,
}

/// `None`: not present (not found, not executable, or no sandbox).
/// `Some(version)`: present; the version is empty when `--version` failed.
fn probe(argv0: &str, binds: &[String], set_env: &[(String, String)], on: &On) -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let mut c = Command::new(exe);
    c.args(["run", "--timeout", "30s", "--memory", "2G"]);
    if let Some(i) = on.image {
        c.args(["--image", i]);
        if let Some(d) = on.data_dir {
            c.arg("--data-dir").arg(d);
        }
    }
    for b in binds {
        c.args(["--ro-bind", b]);
    }
    for (k, v) in set_env {
        c.args(["--env", &format!("{k}={v}")]);
    }
    c.args(["--", argv0, "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().ok()?;
    let out = wait_timeout(child, Duration::from_secs(40))?;
    match out.status.code() {
        Some(125..=127) | None => None,
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            Some(
                text.lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_string(),
            )
        }
        Some(_) => Some(String::new()),
    }
}

fn wait_timeout(child: std::process::Child, d: Duration) -> Option<std::process::Output> {
    // the sandbox enforces its own 30 s timeout; this is a backstop
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(d).ok()?.ok()
}

pub fn main(a: AgentsArgs) -> ExitCode {
    let tables = match &a.config {
        Some(p) => match agentvm_server::Settings::load(p) {
            Ok(f) => f.agents,
            Err(e) => {
                eprintln!("agentvm agents: {e}");
                return ExitCode::from(2);
            }
        },
        None => Default::default(),
    };
    let mut agents = match agentvm_server::config::profiles(tables) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("agentvm agents: {e}");
            return ExitCode::from(2);
        }
    };
    agentvm_server::config::find_installed(&mut agents);
    let mut rows = Vec::new();
    for (name, p) in &agents {
        let argv0 = p.argv.first().cloned().unwrap_or_default();
        let env: Vec<(String, String)> = p
            .set_env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let on = On {
            image: a.image.as_deref().or(p.image.as_deref()),
            data_dir: a.data_dir.as_deref(),
        };
        let version = probe(&argv0, &p.ro_binds, &env, &on);
        let hint = match &version {
            Some(_) => None,
            None if argv0.contains('/') => Some(format!("{argv0} is not there, or the sandbox cannot run it")),
            None => Some(format!(
                "{argv0} is not on the sandbox's PATH{}; install it there, or point the profile at it in the server's config ([agents.{name}] command = \"/path/to/{argv0}\", see docs/AGENTS.md)",
                if p.search.is_empty() {
                    String::new()
                } else {
                    format!(" nor at {}", p.search.join(", "))
                }
            )),
        };
        rows.push(json!({"name": name, "command": argv0, "present": version.is_some(), "version": version, "network": p.network, "image": on.image, "hint": hint}));
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
    } else {
        println!(
            "{:<10} {:<8} {:<30} {:<10} COMMAND",
            "AGENT", "PRESENT", "VERSION", "NETWORK"
        );
        for r in &rows {
            let net: String = r["network"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(10)
                .collect();
            println!(
                "{:<10} {:<8} {:<30} {:<10} {}",
                r["name"].as_str().unwrap_or(""),
                if r["present"] == true { "yes" } else { "no" },
                r["version"]
                    .as_str()
                    .filter(|v| !v.is_empty())
                    .unwrap_or("-")
                    .chars()
                    .take(30)
                    .collect::<String>(),
                net,
                r["command"].as_str().unwrap_or("")
            );
        }
        for r in &rows {
            if let Some(h) = r["hint"].as_str() {
                println!("  {}: {h}", r["name"].as_str().unwrap_or(""));
            }
        }
    }
    ExitCode::SUCCESS
}
