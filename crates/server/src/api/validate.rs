//! A job request judged at the boundary: agent, repo inside an allowed
//! root, network narrowing only, refused agent flags; then accepted.

use super::*;

pub(super) const MAX_EXTRA_ARGS: usize = 64;
pub(super) const MAX_ARG_LEN: usize = 4096;
pub(super) const MAX_PROMPT: usize = 256 * 1024;
pub(super) const MAX_NETWORK: usize = 4096;

/// What every job request carries, once validated.
pub(super) struct Valid {
    pub(super) agent: String,
    pub(super) prompt: String,
    pub(super) repo: PathBuf,
    pub(super) timeout: i64,
    pub(super) extra_args: Vec<String>,
    /// The job's own network policy, canonical; `None`: its profile's.
    pub(super) network: Option<String>,
}

/// One job request as it arrived.
pub(super) struct Ask<'a> {
    pub(super) agent: &'a str,
    pub(super) prompt: &'a str,
    pub(super) repo_path: &'a str,
    pub(super) timeout: i64,
    pub(super) extra: &'a [String],
    pub(super) network: Option<&'a str>,
}

pub(super) fn validate(st: &AppState, caller: &Caller, a: &Ask) -> ApiResult<Valid> {
    if !(1..=3600).contains(&a.timeout) {
        return Err(ApiError::field(
            "body",
            "timeout",
            "timeout must be between 1 and 3600 seconds",
        ));
    }
    if a.prompt.is_empty() {
        return Err(ApiError::field(
            "body",
            "prompt",
            "prompt must not be empty",
        ));
    }
    if a.prompt.len() > MAX_PROMPT || a.prompt.contains('\0') {
        return Err(ApiError::field(
            "body",
            "prompt",
            "prompt must be at most 256 KiB and contain no NUL",
        ));
    }
    if a.extra.len() > MAX_EXTRA_ARGS
        || a.extra
            .iter()
            .any(|x| x.len() > MAX_ARG_LEN || x.contains('\0'))
    {
        return Err(ApiError::field(
            "body",
            "extra_args",
            "at most 64 arguments of at most 4096 bytes, no NUL",
        ));
    }
    if a.repo_path.is_empty() || a.repo_path.contains('\0') {
        return Err(ApiError::field(
            "body",
            "repo_path",
            "repo_path must be a non-empty path",
        ));
    }
    let Some(profile) = st.cfg.agents.get(a.agent) else {
        let valid: Vec<&str> = st.cfg.agents.keys().map(String::as_str).collect();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "Unknown agent '{}'. Valid agents: {}",
                agentvm_store::bounded(a.agent, 64),
                valid.join(", ")
            ),
        ));
    };
    if let Some((arg, flag)) = profile.refused_arg(a.extra) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "extra_args: {} ({flag}) changes where the {} agent's traffic or credentials go; its profile refuses it (refused_args in the server's config)",
                agentvm_store::bounded(arg, 64),
                a.agent
            ),
        ));
    }
    let network = match a.network {
        None => None,
        Some(n) => Some(check_network(profile, a.agent, n, caller)?),
    };
    let repo = check_repo(&st.roots, a.repo_path)?;
    Ok(Valid {
        agent: a.agent.into(),
        prompt: a.prompt.into(),
        repo,
        timeout: a.timeout,
        extra_args: a.extra.to_vec(),
        network,
    })
}

/// A job's own network policy may narrow its profile's, never widen it:
/// a key may go beyond the profile only as far as an admin granted it
/// (its `network`), and admin keys may use any policy. Loopback, private
/// and metadata addresses are reachable only when named, so only an
/// admin-set profile or grant can open them. Returns the canonical form.
pub(super) fn check_network(
    profile: &crate::config::Profile,
    agent: &str,
    n: &str,
    caller: &Caller,
) -> ApiResult<String> {
    if n.len() > MAX_NETWORK {
        return Err(ApiError::field(
            "body",
            "network",
            format!("network must be at most {MAX_NETWORK} bytes"),
        ));
    }
    let want = NetworkMode::parse(n).map_err(|e| ApiError::field("body", "network", e))?;
    let base = profile.network_mode();
    let grant = caller
        .key
        .network
        .as_deref()
        .and_then(|g| NetworkMode::parse(g).ok());
    if caller.is_admin() || base.covers(&want) || grant.is_some_and(|g| g.covers(&want)) {
        return Ok(want.to_string());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "network {want} is wider than the {agent} profile's ({base}): a request may only narrow it; an admin can grant a key more (agentvm keys create --network)"
        ),
    ))
}

/// `repo_path` must be an absolute path to a directory inside an allowed
/// root after every symlink is resolved.
pub fn check_repo(roots: &[PathBuf], repo_path: &str) -> ApiResult<PathBuf> {
    let p = Path::new(repo_path);
    let shown = agentvm_store::bounded(repo_path, 512);
    if !p.is_absolute() {
        return Err(ApiError::field(
            "body",
            "repo_path",
            format!("{shown} is not an absolute path"),
        ));
    }
    if roots.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "No allowed roots are configured: start the server with --allowed-root DIR (or allowed_roots in the config file) to let jobs use repositories under DIR",
        ));
    }
    let canon = std::fs::canonicalize(p).map_err(|_| {
        ApiError::field(
            "body",
            "repo_path",
            format!("{shown} does not exist or the server cannot read it"),
        )
    })?;
    if !canon.is_dir() {
        return Err(ApiError::field(
            "body",
            "repo_path",
            format!("{shown} is not a directory"),
        ));
    }
    if !roots.iter().any(|r| canon.starts_with(r)) {
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} is outside the allowed roots ({}); the server's --allowed-root (allowed_roots in its config) decides which trees jobs may use",
                canon.display(),
                list.join(", ")
            ),
        ));
    }
    Ok(canon)
}

pub(super) fn new_job_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("job_{}", hex::encode(b))
}

pub(super) fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull(n) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("The job queue is full ({n} waiting); retry later"),
        )
        .retry(5),
        SubmitError::Draining => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The server is shutting down and accepts no new jobs",
        )
        .retry(10),
        SubmitError::Store(e) => e.into(),
    }
}

/// Validate a job request, queue it, and audit the outcome under `action`.
pub(super) async fn accept(
    st: &AppState,
    caller: &Caller,
    action: &str,
    ask: &Ask<'_>,
) -> ApiResult<Job> {
    let v = match validate(st, caller, ask) {
        Ok(v) => v,
        Err(e) => {
            let outcome = format!("rejected {}", e.status.as_u16());
            caller.record(st, action, None, &outcome, None).await;
            return Err(e);
        }
    };
    let job = st
        .runner
        .submit(NewJob {
            id: new_job_id(),
            agent: v.agent,
            prompt: v.prompt,
            repo_path: v.repo.to_string_lossy().into_owned(),
            timeout_s: v.timeout,
            extra_args: v.extra_args,
            key_id: Some(caller.key.id.clone()),
            network: v.network,
        })
        .await
        .map_err(submit_error)?;
    caller
        .record(st, action, Some(&job.id), "accepted", None)
        .await;
    Ok(job)
}
