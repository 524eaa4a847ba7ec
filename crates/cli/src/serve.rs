//! `agentvm serve`, `agentvm backup`, `agentvm restore`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agentvm_server::settings::Host;
use agentvm_server::{Config, Settings};
use clap::Args;

/// Settings come from the config file, then AGENTVM_* variables, then
/// flags (flags win).
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    settings: Settings,
}

pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/agentvm");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("agentvm");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/agentvm"),
        None => PathBuf::from("agentvm-data"),
    }
}

fn config(a: ServeArgs) -> Result<Config, String> {
    let file = match &a.settings.config {
        Some(p) => Settings::load(p)?,
        None => Settings::default(),
    };
    file.over(a.settings).resolve(Host {
        default_data_dir: default_data_dir(),
        sandbox_bin: sandbox_runner()?,
    })
}

/// What runs each job's sandbox: the slim `agentvm-run` beside this
/// binary (a much smaller image for every supervisor to map and relocate),
/// else this binary itself (`agentvm run`), which does the same.
fn sandbox_runner() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding the agentvm binary: {e}"))?;
    let slim = exe.with_file_name("agentvm-run");
    match trusted_beside(&exe, &slim) {
        Ok(()) => Ok(slim),
        Err(why) => {
            eprintln!(
                "agentvm: note: {} {why}, so jobs run under `agentvm run` (the same, with more memory per sandbox); `cargo build --release` builds both",
                slim.display()
            );
            Ok(exe)
        }
    }
}

/// Whether `other`, beside `exe`, may be run in its stead: a regular
/// executable file owned by root or by `exe`'s owner, that neither it nor
/// its directory lets anyone else write. The server may run as root, and a
/// binary that another user could plant (say in a world-writable
/// directory) must never be started.
fn trusted_beside(exe: &Path, other: &Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = match std::fs::metadata(other) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("is missing".into()),
        Err(e) => return Err(format!("cannot be read ({e})")),
    };
    let owner = std::fs::metadata(exe).map(|m| m.uid()).unwrap_or(0);
    let dir = other.parent().and_then(|d| std::fs::metadata(d).ok());
    if !m.is_file() || m.permissions().mode() & 0o111 == 0 {
        Err("is not an executable file".into())
    } else if m.uid() != 0 && m.uid() != owner {
        Err(format!(
            "belongs to uid {}, not to root or agentvm's owner",
            m.uid()
        ))
    } else if m.permissions().mode() & 0o022 != 0 {
        Err("is writable by others".into())
    } else if dir.is_none_or(|d| d.permissions().mode() & 0o022 != 0) {
        Err("sits in a directory others can write".into())
    } else {
        Ok(())
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("agentvm: starting the runtime: {e}");
            ExitCode::from(1)
        })
}

pub fn serve(a: ServeArgs) -> ExitCode {
    let cfg = match config(a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentvm serve: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    match rt.block_on(agentvm_server::serve(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentvm serve: {e}");
            ExitCode::from(1)
        }
    }
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Where to write the copy (must not exist).
    file: PathBuf,
    #[arg(long, value_name = "DIR", env = "AGENTVM_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// A consistent online copy, safe while the server runs.
pub fn backup(a: BackupArgs) -> ExitCode {
    let dir = a.data_dir.unwrap_or_else(default_data_dir);
    let db = agentvm_server::db_path(&dir);
    if !db.exists() {
        eprintln!("agentvm backup: no database at {}", db.display());
        return ExitCode::from(1);
    }
    if a.file.exists() {
        eprintln!(
            "agentvm backup: {} exists; refusing to overwrite it",
            a.file.display()
        );
        return ExitCode::from(1);
    }
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    let res = rt.block_on(async {
        let s = agentvm_store::Store::open(&db).await?;
        let r = s.backup(&a.file).await;
        s.close().await;
        r
    });
    match res {
        Ok(()) => {
            eprintln!(
                "agentvm: backed up {} to {}",
                db.display(),
                a.file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentvm backup: {e}");
            ExitCode::from(1)
        }
    }
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// A file made by `agentvm backup`.
    file: PathBuf,
    #[arg(long, value_name = "DIR", env = "AGENTVM_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// Put a backup in place; refuses while a server uses the data directory.
pub fn restore(a: RestoreArgs) -> ExitCode {
    let dir = a.data_dir.unwrap_or_else(default_data_dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("agentvm restore: {}: {e}", dir.display());
        return ExitCode::from(1);
    }
    let _lock = match agentvm_server::lock_data_dir(&dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("agentvm restore: {e}; stop the server first");
            return ExitCode::from(1);
        }
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    // the store checks the backup is one of ours before touching anything
    let db = agentvm_server::db_path(&dir);
    if let Err(e) = rt.block_on(agentvm_store::sqlite::restore(&a.file, &db)) {
        eprintln!("agentvm restore: {e}");
        return ExitCode::from(1);
    }
    eprintln!(
        "agentvm: restored {} into {}",
        a.file.display(),
        Path::new(&dir).display()
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::trusted_beside;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &std::path::Path, name: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn only_a_runner_nobody_else_could_have_planted_is_used() {
        let d = tempfile::tempdir().unwrap();
        let exe = file(d.path(), "agentvm", 0o755);
        let run = d.path().join("agentvm-run");
        assert_eq!(trusted_beside(&exe, &run), Err("is missing".into()));
        file(d.path(), "agentvm-run", 0o644);
        assert_eq!(
            trusted_beside(&exe, &run),
            Err("is not an executable file".into())
        );
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o757)).unwrap();
        assert_eq!(
            trusted_beside(&exe, &run),
            Err("is writable by others".into())
        );
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(trusted_beside(&exe, &run), Ok(()));
        // a directory others may write (like /tmp) can hold a planted one
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(
            trusted_beside(&exe, &run),
            Err("sits in a directory others can write".into())
        );
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // another user's file
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&run, Some(65534), None).unwrap();
            assert_eq!(
                trusted_beside(&exe, &run),
                Err("belongs to uid 65534, not to root or agentvm's owner".into())
            );
        }
    }
}
