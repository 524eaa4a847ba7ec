//! The CLI as a client of `agentvm serve`: `agentvm jobs ...`, `agentvm
//! shell`, `agentvm sessions ...`, `agentvm keys ...`.
//!
//! The server URL and key come from flags, else AGENTVM_URL / AGENTVM_API_KEY
//! (or AGENTVM_API_KEY_FILE), else ~/.config/agentvm/client.toml
//! (`url = "..."`, `api_key_file = "..."`), else http://127.0.0.1:8000.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agentvm_proto::api::ErrorBody;
use clap::Args;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Server URL [env AGENTVM_URL; default http://127.0.0.1:8000].
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// API key [env AGENTVM_API_KEY]. Prefer --api-key-file: flags show up in `ps`.
    #[arg(long, global = true, value_name = "KEY")]
    api_key: Option<String>,
    /// File holding the API key [env AGENTVM_API_KEY_FILE].
    #[arg(long, global = true, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Print JSON instead of text (for scripts).
    #[arg(long, global = true)]
    json: bool,
}

mod attach;
mod jobs;
mod keys;
mod sessions;
mod workspaces;

pub use jobs::{jobs, JobsCmd};
pub use keys::{audit, keys, KeysCmd};
pub use sessions::{sessions, shell, SessionsCmd, ShellArgs};
pub use workspaces::{workspaces, WorkspacesCmd};

struct Client {
    url: String,
    key: Option<String>,
    http: reqwest::Client,
    json: bool,
}

#[derive(serde::Deserialize, Default)]
struct ClientFile {
    url: Option<String>,
    api_key_file: Option<PathBuf>,
}

fn read_key_file(p: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("reading the API key from {}: {e}", p.display()))
}

/// An API path from its segments and query: every value is exactly one
/// percent-encoded segment or parameter, so an id such as `../keys` or
/// `x?limit=1` names a job that does not exist instead of another route.
/// `.` and `..`, which URL parsers resolve even when encoded, are refused.
fn api_path(segments: &[&str], query: &[(&str, &str)]) -> Result<String, String> {
    if let Some(bad) = segments.iter().find(|s| matches!(**s, "" | "." | "..")) {
        return Err(format!("{bad:?} is not an id"));
    }
    let mut u = reqwest::Url::parse("http://agentvm.invalid/").map_err(|e| e.to_string())?;
    u.path_segments_mut()
        .map_err(|()| "the base URL cannot hold a path".to_string())?
        .extend(segments);
    if !query.is_empty() {
        u.query_pairs_mut().extend_pairs(query);
    }
    let mut out = u.path().to_string();
    if let Some(q) = u.query() {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

impl Client {
    fn new(c: &Conn) -> Result<Client, String> {
        let file: ClientFile = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".config/agentvm/client.toml"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| toml::from_str(&t).map_err(|e| format!("~/.config/agentvm/client.toml: {e}")))
            .transpose()?
            .unwrap_or_default();
        let url = c
            .server
            .clone()
            .or_else(|| std::env::var("AGENTVM_URL").ok())
            .or(file.url)
            .unwrap_or_else(|| "http://127.0.0.1:8000".into())
            .trim_end_matches('/')
            .to_string();
        let key = match (&c.api_key, &c.api_key_file) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(f)) => Some(read_key_file(f)?),
            (None, None) => match (
                std::env::var("AGENTVM_API_KEY"),
                std::env::var_os("AGENTVM_API_KEY_FILE"),
            ) {
                (Ok(k), _) => Some(k),
                (_, Some(f)) => Some(read_key_file(&PathBuf::from(f))?),
                _ => match &file.api_key_file {
                    Some(f) => Some(read_key_file(f)?),
                    // a server of this user's on the embedded defaults wrote
                    // its first admin key here
                    None => {
                        let local = crate::serve::default_data_dir().join("admin.key");
                        std::fs::read_to_string(&local)
                            .ok()
                            .map(|s| s.trim().to_string())
                    }
                },
            },
        };
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return Err(format!(
                "no API key: pass --api-key-file FILE or set AGENTVM_API_KEY_FILE (a new server writes its first admin key to {}/admin.key, or /var/lib/agentvm/admin.key when it runs as root; an admin makes more with `agentvm keys create`)",
                crate::serve::default_data_dir().display()
            ));
        };
        let key = Some(key);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Client {
            url,
            key,
            http,
            json: c.json,
        })
    }

    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(m, format!("{}{path}", self.url));
        match &self.key {
            Some(k) => r.header("X-API-Key", k),
            None => r,
        }
    }

    /// Send; a 429 (rate limit, full queue) is retried after its
    /// Retry-After, a few times, saying so on stderr; any other non-2xx
    /// answer becomes one clear line.
    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, String> {
        let mut r = r;
        let mut retries = 0;
        let resp = loop {
            let again = r.try_clone();
            let resp = r.send().await.map_err(|e| {
                if e.is_connect() {
                    format!(
                        "cannot reach the server at {} (is `agentvm serve` running?)",
                        self.url
                    )
                } else {
                    e.to_string()
                }
            })?;
            match again {
                Some(next) if resp.status().as_u16() == 429 && retries < MAX_RETRIES => {
                    let secs = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(1)
                        .clamp(1, 60);
                    eprintln!("agentvm: the server is busy (429); trying again in {secs} s");
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                    retries += 1;
                    r = next;
                }
                _ => break resp,
            }
        };
        self.send_checked(resp).await
    }

    /// A non-2xx answer as one clear line.
    async fn send_checked(&self, resp: reqwest::Response) -> Result<reqwest::Response, String> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let detail = serde_json::from_str::<ErrorBody>(&body)
            .map(|e| e.to_string())
            .unwrap_or(body);
        if status.as_u16() == 401 {
            return Err(format!(
                "the server at {} refused the API key ({detail}): it was revoked, or it belongs to another server; pass the right one with --api-key-file or AGENTVM_API_KEY_FILE",
                self.url
            ));
        }
        Err(format!(
            "{} {}: {detail}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        ))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        read(self.send(self.req(reqwest::Method::GET, path)).await?).await
    }

    async fn call<T: DeserializeOwned>(&self, r: reqwest::RequestBuilder) -> Result<T, String> {
        read(self.send(r).await?).await
    }
}

/// How often a 429 is retried before it is reported.
const MAX_RETRIES: u32 = 5;

/// An answer read as the type the API says it is.
async fn read<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, String> {
    let b = resp
        .bytes()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    serde_json::from_slice(&b)
        .map_err(|e| format!("the server's answer is not what this client expects: {e}"))
}

fn print_json<T: Serialize + ?Sized>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn ago(ms: Option<i64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    let now = agentvm_store::now_ms();
    let s = ((now - ms) / 1000).max(0);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn rt() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn finish(r: Result<ExitCode, String>) -> ExitCode {
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentvm: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::api_path;

    #[test]
    fn a_value_is_one_segment_or_one_parameter() {
        let p = |s: &[&str], q: &[(&str, &str)]| api_path(s, q).unwrap();
        assert_eq!(p(&["v1", "jobs", "../keys"], &[]), "/v1/jobs/..%2Fkeys");
        assert_eq!(
            p(&["v1", "jobs", "x?limit=1#f"], &[]),
            "/v1/jobs/x%3Flimit=1%23f"
        );
        assert_eq!(p(&["v1", "jobs", "%2e%2e"], &[]), "/v1/jobs/%252e%252e");
        assert_eq!(
            p(
                &["v1", "jobs"],
                &[("agent", "shell&status=queued"), ("limit", "5")]
            ),
            "/v1/jobs?agent=shell%26status%3Dqueued&limit=5"
        );
        for bad in ["..", ".", ""] {
            assert!(api_path(&["v1", "jobs", bad], &[]).is_err(), "{bad:?}");
        }
    }
}
