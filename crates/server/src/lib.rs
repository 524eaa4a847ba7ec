//! # agentvm-server: the control plane
//!
//! Owns the HTTP API (the compat `/agent/run` and `/v1`), authentication,
//! validation, the scheduler and runner, OpenAPI, metrics and logs. Jobs run
//! in `agentvm run` processes (the jailer); state lives in agentvm-store.
//!
//! It must never: run a shell on request input (the prompt is one argv
//! element of a profile's template); log or store an API key's secret;
//! accept a repo outside the allowed roots; lose an accepted job.

pub mod api;
pub mod auth;
pub mod config;
pub mod metrics;
pub mod output;
pub mod recording;
pub mod redact;
pub mod retention;
pub mod runner;
pub mod service;
pub mod session;
pub mod settings;
pub mod ssh;
pub mod ui;
pub mod verdict;
pub use agentvm_proto::units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_store::{ApiKey, Store};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{any, get, post};
use axum::Router;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa::OpenApi;

pub use config::{Config, Profile};
pub use settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] agentvm_store::StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// The lock file a running server holds (restore refuses while it is held).
pub fn lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join("agentvm.lock")
}

pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("agentvm.db")
}

/// Take the data directory's lock; fails when another server holds it.
pub fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, ServeError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(data_dir))
        .map_err(io(format!("opening {}", lock_path(data_dir).display())))?;
    // SAFETY: flock on a descriptor we own.
    let r = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if r != 0 {
        return Err(ServeError::Config(format!(
            "another agentvm server is using {} (its lock is held)",
            data_dir.display()
        )));
    }
    Ok(f)
}

/// Register the key in `file` (a secrets manager's file) as an admin key.
/// Only its hash is stored.
async fn register_key_file(store: &Store, file: &Path) -> Result<(), ServeError> {
    let secret =
        std::fs::read_to_string(file).map_err(io(format!(
            "the admin key file {} (--api-key-file, AGENTVM_ADMIN_KEY_FILE or api_key_file in the config)",
            file.display()
        )))?;
    let secret = secret.trim();
    if secret.len() < 16 {
        return Err(ServeError::Config(format!(
            "the admin key file {} (--api-key-file, AGENTVM_ADMIN_KEY_FILE or api_key_file in the config): the key is shorter than 16 characters",
            file.display()
        )));
    }
    let h = auth::hash(secret);
    if store.key_by_hash(&h).await?.is_none() {
        store
            .insert_key(&ApiKey {
                id: auth::new_key_id(),
                name: format!("from {}", file.display()),
                hash: h,
                scopes: vec!["admin".into()],
                source: "file".into(),
                created_at: agentvm_store::now_ms(),
                revoked_at: None,
                network: None,
            })
            .await?;
    }
    Ok(())
}

/// On the very first start: an admin key, written once to a 0600 file.
async fn bootstrap_key(store: &Store, data_dir: &Path) -> Result<Option<PathBuf>, ServeError> {
    if store.count_keys().await? > 0 {
        return Ok(None);
    }
    let secret = auth::new_secret();
    let path = data_dir.join("admin.key");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(format!("writing {}", path.display())))?;
        f.write_all(format!("{secret}\n").as_bytes())
            .map_err(io("writing the admin key"))?;
    }
    store
        .insert_key(&ApiKey {
            id: auth::new_key_id(),
            name: "bootstrap admin".into(),
            hash: auth::hash(&secret),
            scopes: vec!["admin".into()],
            source: "bootstrap".into(),
            created_at: agentvm_store::now_ms(),
            revoked_at: None,
            network: None,
        })
        .await?;
    Ok(Some(path))
}

#[derive(Clone, Default)]
struct Ids(Arc<AtomicU64>);

impl MakeRequestId for Ids {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{:x}-{n}", std::process::id()))
            .ok()
            .map(RequestId::new)
    }
}

/// One JSON log line and one metric per request. Never logs headers or
/// bodies (they carry keys and prompts).
async fn observe(State(st): State<Arc<api::AppState>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let rid = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    st.metrics
        .http
        .get_or_create(&metrics::HttpLabels {
            route: route.clone(),
            method: method.clone(),
            status,
        })
        .inc();
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    // a read that worked is routine (a client polling a job makes many):
    // debug; everything else (mutations, errors) at info
    if method == "GET" && status < 400 {
        tracing::debug!(request_id = %rid, method = %method, route = %route, status, ms, "request");
    } else {
        tracing::info!(request_id = %rid, method = %method, route = %route, status, ms, "request");
    }
    resp
}

pub fn router(st: Arc<api::AppState>) -> Router {
    let hdr = |n: &'static str, v: &'static str| {
        SetResponseHeaderLayer::if_not_present(
            HeaderName::from_static(n),
            HeaderValue::from_static(v),
        )
    };
    // every route here needs a key: the gate checks it before any body
    // is read
    let keyed = Router::new()
        .route("/agent/run", post(api::agent_run))
        .route("/v1/jobs", post(api::create_job).get(api::list_jobs))
        .route("/v1/jobs/{id}", get(api::get_job).delete(api::delete_job))
        .route("/v1/jobs/{id}/logs", get(api::job_logs))
        .route("/v1/jobs/{id}/patch", get(api::job_patch))
        .route("/v1/jobs/{id}/recording", get(api::job_recording))
        .route("/v1/jobs/{id}/cancel", post(api::cancel_job))
        .route("/v1/jobs/{id}/apply", post(api::apply_job))
        .route(
            "/v1/sessions",
            post(api::create_session).get(api::list_sessions),
        )
        .route(
            "/v1/sessions/{id}",
            get(api::get_session).delete(api::delete_session),
        )
        .route("/v1/sessions/{id}/attach", get(api::attach_session))
        .route("/v1/sessions/{id}/patch", get(api::session_patch))
        .route("/v1/sessions/{id}/apply", post(api::apply_session))
        .route("/v1/sessions/{id}/pause", post(api::pause_session))
        .route("/v1/sessions/{id}/resume", post(api::resume_session))
        .route("/v1/sessions/{id}/recording", get(api::session_recording))
        .route("/v1/sessions/{id}/ports/{port}", any(api::session_port))
        .route("/v1/sessions/{id}/ports/{port}/", any(api::session_port))
        .route(
            "/v1/sessions/{id}/ports/{port}/{*path}",
            any(api::session_port),
        )
        .route(
            "/v1/workspaces",
            post(api::create_workspace).get(api::list_workspaces),
        )
        .route(
            "/v1/workspaces/{id}",
            get(api::get_workspace).delete(api::delete_workspace),
        )
        .route(
            "/v1/workspaces/{id}/checkpoints",
            post(api::create_checkpoint).get(api::list_checkpoints),
        )
        .route(
            "/v1/workspaces/{id}/checkpoints/{checkpoint}",
            axum::routing::delete(api::delete_checkpoint),
        )
        .route("/v1/workspaces/{id}/restore", post(api::restore_workspace))
        .route("/v1/workspaces/{id}/patch", get(api::workspace_patch))
        .route("/v1/workspaces/{id}/diff", get(api::workspace_diff))
        .route("/v1/workspaces/{id}/apply", post(api::apply_workspace))
        .route("/v1/workspaces/{id}/verify", post(api::verify_workspace))
        .route("/v1/keys", post(api::create_key).get(api::list_keys))
        .route("/v1/keys/{id}", axum::routing::delete(api::revoke_key))
        .route("/v1/audit", get(api::list_audit))
        .route("/metrics", get(api::metrics))
        .route_layer(axum::middleware::from_fn_with_state(st.clone(), api::gate));
    let api = Router::new()
        .route("/health", get(api::health))
        .merge(keyed)
        .layer(hdr(
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'",
        ));
    let docs = Router::new()
        .merge(utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", api::ApiDoc::openapi()))
        .layer(hdr(
            "content-security-policy",
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
        ));
    // the web UI: no key needed to load it (it asks for one), its own CSP
    let ui = Router::new()
        .route("/", get(ui::index))
        .route("/ui/{*name}", get(ui::asset));
    let limit = st.cfg.body_limit;
    Router::new()
        .merge(api)
        .merge(docs)
        .merge(ui)
        .layer(axum::middleware::from_fn_with_state(st.clone(), observe))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(hdr("x-content-type-options", "nosniff"))
        .layer(hdr("x-frame-options", "DENY"))
        .layer(hdr("referrer-policy", "no-referrer"))
        .layer(hdr("cache-control", "no-store"))
        .layer(hdr("cross-origin-resource-policy", "same-origin"))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(Ids::default()))
        .with_state(st)
}

/// Requests without a valid key allowed per client address per minute
/// (bursts of 10); beyond, 429 and nothing stored.
pub const ANON_PER_MINUTE: u32 = 60;
/// Refused anonymous mutations audited one by one per minute, all
/// addresses together; beyond, only counted.
pub const ANON_AUDIT_PER_MINUTE: u32 = 120;

/// Wait for SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Run the server until SIGTERM/SIGINT.
pub async fn serve(cfg: Config) -> Result<(), ServeError> {
    for (name, p) in &cfg.agents {
        p.validate(name).map_err(ServeError::Config)?;
    }
    // the addresses first: a port in use must fail before a database and
    // a key are made
    let listener = std::net::TcpListener::bind(cfg.listen).map_err(|e| {
        ServeError::Config(format!(
            "cannot listen on {}: {e} (is another server running? choose another address with --listen)",
            cfg.listen
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(io("preparing the listener"))?;
    let ssh_listener = match cfg.ssh_listen {
        None => None,
        Some(a) => {
            let l = std::net::TcpListener::bind(a).map_err(|e| {
                ServeError::Config(format!(
                    "cannot listen for SSH on {a}: {e} (choose another address with --ssh-listen)"
                ))
            })?;
            l.set_nonblocking(true)
                .map_err(io("preparing the SSH listener"))?;
            // a wrong keys file is refused before anything is stored
            if let Some(k) = &cfg.ssh_authorized_keys {
                ssh::AuthorizedKeys::load(k)
                    .map_err(|e| ServeError::Config(format!("--ssh-authorized-keys {e}")))?;
            }
            Some(l)
        }
    };
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(io(format!("creating {}", cfg.data_dir.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700));
    }
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let mut roots = Vec::new();
    for r in &cfg.allowed_roots {
        roots
            .push(std::fs::canonicalize(r).map_err(io(format!("--allowed-root {}", r.display())))?);
    }
    if roots.is_empty() {
        eprintln!(
            "agentvm: note: no --allowed-root is set, so no job can run yet: restart with --allowed-root DIR (or allowed_roots in the config file) to let jobs use the repositories under DIR"
        );
    }
    let store = Store::open(&db_path(&cfg.data_dir)).await?;
    if let Some(f) = &cfg.api_key_file {
        register_key_file(&store, f).await?;
    }
    if let Some(p) = bootstrap_key(&store, &cfg.data_dir).await? {
        eprintln!(
            "agentvm: created the first admin API key; it is in {} (readable only by you)",
            p.display()
        );
    }
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(metrics::Metrics::new());
    let runner = runner::Runner::new(store.clone(), cfg.clone(), metrics.clone());
    let (interrupted, requeued) = runner.recover().await?;
    if interrupted + requeued > 0 {
        tracing::info!(
            interrupted,
            requeued,
            "recovered jobs from the previous run"
        );
    }
    let svc = Arc::new(service::Service::new(
        runner.clone(),
        store.clone(),
        cfg.clone(),
        roots,
    ));
    // layers nothing names (a crash mid-job, a delete cut short), and a
    // patch's scratch left by a crash, before any job runs
    svc.sweep_layers().await;
    let _ = std::fs::remove_dir_all(cfg.data_dir.join("layers-scratch"));
    // sandboxes a killed server left behind: a frozen one (a paused
    // session) holds its processes' SIGKILL until thawed
    let parent = cfg.cgroup_parent.clone();
    let _ =
        tokio::task::spawn_blocking(move || agentvm_sandbox::cgroup::sweep_all(parent.as_deref()))
            .await;
    runner.start_workers();
    tokio::spawn(retention::run(svc.clone()));
    let ssh_task = match (ssh_listener, &cfg.ssh_authorized_keys) {
        (Some(l), Some(keys)) => {
            let key = ssh::host_key(&cfg.data_dir).map_err(ServeError::Config)?;
            let fp = ssh::fingerprint(key.public_key());
            let (door, n) = ssh::Door::new(svc.clone(), key, keys.clone())
                .map_err(|e| ServeError::Config(format!("--ssh-authorized-keys {e}")))?;
            let addr = l.local_addr().map_err(io("the SSH listener"))?;
            let l = tokio::net::TcpListener::from_std(l).map_err(io("the SSH listener"))?;
            eprintln!("agentvm: SSH on {addr}, host key {fp}, {n} authorized keys");
            Some(tokio::spawn(Arc::new(door).serve(l)))
        }
        _ => None,
    };
    let sessions = svc.sessions.clone();
    let st = Arc::new(api::AppState {
        svc,
        metrics,
        limiter: auth::RateLimiter::new(cfg.rate_limit),
        anon: auth::RateLimiter::new(ANON_PER_MINUTE),
        anon_audit: auth::RateLimiter::new(ANON_AUDIT_PER_MINUTE),
    });
    let app = router(st).into_make_service_with_connect_info::<SocketAddr>();
    let tls = matches!((&cfg.tls_cert, &cfg.tls_key), (Some(_), Some(_)));
    if !cfg.listen.ip().is_loopback() && !tls {
        eprintln!(
            "agentvm: WARNING: listening on {} without TLS: API keys and prompts cross the network in clear text (use --tls-cert and --tls-key)",
            cfg.listen
        );
    }
    let handle = axum_server::Handle::new();
    let h2 = handle.clone();
    let grace = Duration::from_secs(cfg.shutdown_grace_s);
    let r2 = runner.clone();
    let drained = tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!(
            "shutting down: no new jobs; running jobs get {}s",
            grace.as_secs()
        );
        // stop accepting connections but let in-flight requests finish
        h2.graceful_shutdown(Some(grace + Duration::from_secs(5)));
        if let Some(t) = ssh_task {
            t.abort();
        }
        tokio::join!(r2.shutdown(grace), sessions.shutdown(grace));
    });
    let scheme = if tls { "https" } else { "http" };
    let h3 = handle.clone();
    tokio::spawn(async move {
        if let Some(addr) = h3.listening().await {
            eprintln!("agentvm: listening on {scheme}://{addr}");
        }
    });
    let res = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => {
            // one crypto provider for the whole process: ring
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(c, k)
                .await
                .map_err(io("loading the TLS certificate and key"))?;
            axum_server::from_tcp_rustls(listener, tls)
                .handle(handle)
                .serve(app)
                .await
        }
        (None, None) => {
            axum_server::from_tcp(listener)
                .handle(handle)
                .serve(app)
                .await
        }
        _ => {
            return Err(ServeError::Config(
                "--tls-cert and --tls-key go together".into(),
            ))
        }
    };
    res.map_err(io(format!("serving on {}", cfg.listen)))?;
    // the listener is closed; wait for the jobs' grace period to play out
    let _ = drained.await;
    store.close().await;
    Ok(())
}
