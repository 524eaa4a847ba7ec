//! `/v1/keys`: create, list, revoke (admin).

use super::*;

/// A stored key as the API shows it (its hash never leaves the store).
pub fn key_view(k: agentvm_store::ApiKey) -> KeyView {
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

/// Create an API key (admin). The secret is in the answer, once.
#[utoipa::path(post, path = "/v1/keys", request_body = KeyRequest,
    responses((status = 201, body = NewKey), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 413, description = "Body too large"), (status = 422, body = ValidationError), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn create_key(
    State(st): S,
    caller: Principal,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<NewKey>)> {
    st.need_mut(&caller, Scope::Admin, "key.create", None)
        .await?;
    let req: KeyRequest = parse_body(&body)?;
    Ok((
        StatusCode::CREATED,
        Json(st.create_key(&caller, &req).await?),
    ))
}

/// List API keys (admin); secrets are never shown.
#[utoipa::path(get, path = "/v1/keys",
    responses((status = 200, body = Vec<KeyView>), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn list_keys(State(st): S, caller: Principal) -> ApiResult<Json<Vec<KeyView>>> {
    let keys = st.list_keys(&caller).await?;
    Ok(Json(keys.into_iter().map(key_view).collect()))
}

/// Revoke an API key (admin). The last active admin key cannot be revoked.
#[utoipa::path(delete, path = "/v1/keys/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 401, body = ErrorDetail), (status = 403, body = ErrorDetail),
        (status = 404, body = ErrorDetail), (status = 409, body = ErrorDetail), (status = 429, body = ErrorDetail)),
    security(("api_key" = [])))]
pub async fn revoke_key(
    State(st): S,
    caller: Principal,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    st.revoke_key(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
