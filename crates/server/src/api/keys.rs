//! `/v1/keys`: create, list, revoke (admin).

use super::*;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// A label for people, 1 to 100 characters.
    pub(super) name: String,
    /// Any of read, run, admin.
    pub(super) scopes: Vec<String>,
    /// What this key's jobs may use beyond their profile's network policy
    /// ("none", "host" or "allow:HOST[:PORT],..."); absent: only narrower.
    #[serde(default)]
    pub(super) network: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct KeyView {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) scopes: Vec<String>,
    /// "api", "bootstrap" or "file".
    pub(super) source: String,
    pub(super) created_at: i64,
    pub(super) revoked_at: Option<i64>,
    /// The key's network grant, if any.
    pub(super) network: Option<String>,
}

impl From<ApiKey> for KeyView {
    fn from(k: ApiKey) -> Self {
        KeyView {
            id: k.id,
            name: k.name,
            scopes: k.scopes,
            source: k.source,
            created_at: k.created_at,
            revoked_at: k.revoked_at,
            network: k.network,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct NewKey {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) scopes: Vec<String>,
    /// The secret, shown this once and never again.
    pub(super) key: String,
}

/// Create an API key (admin). The secret is in the answer, once.
#[utoipa::path(post, path = "/v1/keys", request_body = KeyRequest,
    responses((status = 201, body = NewKey), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 413, description = "Body too large"), (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn create_key(
    State(st): S,
    caller: Caller,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<NewKey>)> {
    caller
        .need_mut(&st, Scope::Admin, "key.create", None)
        .await?;
    let req: KeyRequest = parse_body(&body)?;
    let name = req.name.trim().to_string();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::field(
            "body",
            "name",
            "name must be 1 to 100 printable characters",
        ));
    }
    let mut scopes: Vec<String> = Vec::new();
    for s in &req.scopes {
        if Scope::parse(s).is_none() {
            return Err(ApiError::field(
                "body",
                "scopes",
                format!("unknown scope {s:?}: use read, run or admin"),
            ));
        }
        if !scopes.contains(s) {
            scopes.push(s.clone());
        }
    }
    if scopes.is_empty() {
        return Err(ApiError::field("body", "scopes", "give at least one scope"));
    }
    let network = match &req.network {
        None => None,
        Some(n) if n.len() > MAX_NETWORK => {
            return Err(ApiError::field(
                "body",
                "network",
                format!("network must be at most {MAX_NETWORK} bytes"),
            ))
        }
        Some(n) => Some(
            NetworkMode::parse(n)
                .map_err(|e| ApiError::field("body", "network", e))?
                .to_string(),
        ),
    };
    let secret = auth::new_secret();
    let key = ApiKey {
        id: auth::new_key_id(),
        name: name.clone(),
        hash: auth::hash(&secret),
        scopes: scopes.clone(),
        source: "api".into(),
        created_at: agentvm_store::now_ms(),
        revoked_at: None,
        network: network.clone(),
    };
    st.store.insert_key(&key).await?;
    caller
        .record(
            &st,
            "key.create",
            Some(&key.id),
            "ok",
            Some(&match &network {
                Some(n) => format!("{}; network {n}", scopes.join(",")),
                None => scopes.join(","),
            }),
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(NewKey {
            id: key.id,
            name,
            scopes,
            key: secret,
        }),
    ))
}

/// List API keys (admin); secrets are never shown.
#[utoipa::path(get, path = "/v1/keys",
    responses((status = 200, body = Vec<KeyView>), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn list_keys(State(st): S, caller: Caller) -> ApiResult<Json<Vec<KeyView>>> {
    caller.need(Scope::Admin)?;
    Ok(Json(
        st.store
            .list_keys()
            .await?
            .into_iter()
            .map(KeyView::from)
            .collect(),
    ))
}

/// Revoke an API key (admin). The last active admin key cannot be revoked.
#[utoipa::path(delete, path = "/v1/keys/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn revoke_key(
    State(st): S,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    caller
        .need_mut(&st, Scope::Admin, "key.revoke", Some(&id))
        .await?;
    let keys = st.store.list_keys().await?;
    let Some(target) = keys.iter().find(|k| k.id == id && k.revoked_at.is_none()) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("No active key {id}"),
        ));
    };
    let admins = keys
        .iter()
        .filter(|k| k.revoked_at.is_none() && auth::max_scope(&k.scopes) == Some(Scope::Admin))
        .count();
    if auth::max_scope(&target.scopes) == Some(Scope::Admin) && admins <= 1 {
        caller
            .record(&st, "key.revoke", Some(&id), "rejected 409", None)
            .await;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "This is the last active admin key; create another admin key first",
        ));
    }
    st.store.revoke_key(&id).await?;
    caller
        .record(&st, "key.revoke", Some(&id), "ok", None)
        .await;
    Ok(StatusCode::NO_CONTENT)
}
