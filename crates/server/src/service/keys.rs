//! API keys (create, list, revoke) and the audit trail: admin only.

use agentvm_proto::api::{KeyRequest, NewKey};
use agentvm_store::{ApiKey, AuditEvent};

use super::{paged, Error, Principal, Result, Service};
use crate::auth::{self, Scope};

impl Service {
    /// Make a key; its secret is in the answer, once, and only its hash is
    /// stored.
    pub async fn create_key(&self, p: &Principal, req: &KeyRequest) -> Result<NewKey> {
        const A: &str = "key.create";
        self.need_mut(p, Scope::Admin, A, None).await?;
        let name = req.name.trim().to_string();
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(Error::invalid(
                "body",
                "name",
                "name must be 1 to 100 printable characters",
            ));
        }
        let mut scopes: Vec<String> = Vec::new();
        for s in &req.scopes {
            if Scope::parse(s).is_none() {
                return Err(Error::invalid(
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
            return Err(Error::invalid("body", "scopes", "give at least one scope"));
        }
        let network = req
            .network
            .as_deref()
            .map(super::jobs::parse_network)
            .transpose()?;
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
        self.store.insert_key(&key).await?;
        let detail = match &network {
            Some(n) => format!("{}; network {n}", scopes.join(",")),
            None => scopes.join(","),
        };
        self.record(p, A, Some(&key.id), "ok", Some(&detail)).await;
        Ok(NewKey {
            id: key.id,
            name,
            scopes,
            key: secret,
        })
    }

    /// Every key, revoked ones too; never a secret (only hashes are kept).
    pub async fn list_keys(&self, p: &Principal) -> Result<Vec<ApiKey>> {
        p.need(Scope::Admin)?;
        Ok(self.store.list_keys().await?)
    }

    /// Revoke a key. The last active admin key cannot be revoked.
    pub async fn revoke_key(&self, p: &Principal, id: &str) -> Result<()> {
        const A: &str = "key.revoke";
        self.need_mut(p, Scope::Admin, A, Some(id)).await?;
        let keys = self.store.list_keys().await?;
        let Some(target) = keys.iter().find(|k| k.id == id && k.revoked_at.is_none()) else {
            return Err(Error::NotFound(format!(
                "No active key {}",
                agentvm_store::bounded(id, 64)
            )));
        };
        let admins = keys
            .iter()
            .filter(|k| k.revoked_at.is_none() && auth::max_scope(&k.scopes) == Some(Scope::Admin))
            .count();
        if auth::max_scope(&target.scopes) == Some(Scope::Admin) && admins <= 1 {
            let e = Error::Conflict(
                "This is the last active admin key; create another admin key first".into(),
            );
            return self.rejected(p, A, Some(id), e).await;
        }
        self.store.revoke_key(id).await?;
        self.record(p, A, Some(id), "ok", None).await;
        Ok(())
    }

    /// The audit trail, newest first, and the cursor of the next page.
    pub async fn audit_page(
        &self,
        p: &Principal,
        limit: i64,
        cursor: Option<i64>,
        filter: &agentvm_store::AuditFilter,
    ) -> Result<(Vec<AuditEvent>, Option<String>)> {
        p.need(Scope::Admin)?;
        for (name, v) in [
            ("key_id", &filter.key_id),
            ("action", &filter.action),
            ("job", &filter.job),
        ] {
            if let Some(v) = v {
                if v.is_empty() || v.len() > 128 || v.chars().any(|c| c.is_control()) {
                    return Err(Error::invalid(
                        "query",
                        name,
                        format!("{name}: 1 to 128 characters, none a control character"),
                    ));
                }
            }
        }
        let ev = self.store.list_audit(cursor, limit + 1, filter).await?;
        Ok(paged(ev, limit, |e| e.seq))
    }
}
