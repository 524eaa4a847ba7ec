//! Keys, scopes, bearer tokens and the audit trail.

use super::*;

#[test]
fn keys_scopes_bearer_and_audit() {
    let (_t, repo, s) = setup(&[]);
    let mk = |scopes: Value| {
        let (code, v) = s.json(
            "POST",
            "/v1/keys",
            Some(json!({"name": "k", "scopes": scopes})),
        );
        assert_eq!(code, 201, "{v}");
        (
            v["id"].as_str().unwrap_or("").to_string(),
            v["key"].as_str().unwrap_or("").to_string(),
        )
    };
    let (read_id, read) = mk(json!(["read"]));
    let (_, run) = mk(json!(["run"]));
    // read may read, not run
    assert_eq!(s.req("GET", "/v1/jobs", Some(&read), None).0, 200);
    assert_eq!(
        s.req("POST", "/v1/jobs", Some(&read), Some(shell(&repo, "true")))
            .0,
        403
    );
    // run may run and read, not administer
    assert_eq!(
        s.req("POST", "/v1/jobs", Some(&run), Some(shell(&repo, "true")))
            .0,
        202
    );
    assert_eq!(s.req("GET", "/v1/keys", Some(&run), None).0, 403);
    assert_eq!(s.req("GET", "/v1/audit", Some(&run), None).0, 403);
    // Authorization: Bearer works too
    let code = s
        .http
        .get(format!("{}/v1/jobs", s.url))
        .header("Authorization", format!("Bearer {read}"))
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    assert_eq!(code, 200);
    // secrets never listed
    let (_, keys) = s.json("GET", "/v1/keys", None);
    assert!(!keys.to_string().contains(&read));
    assert!(!keys.to_string().contains("avm_"));
    // bad key requests
    assert_eq!(
        s.json(
            "POST",
            "/v1/keys",
            Some(json!({"name": "x", "scopes": ["root"]}))
        )
        .0,
        422
    );
    assert_eq!(
        s.json(
            "POST",
            "/v1/keys",
            Some(json!({"name": "", "scopes": ["read"]}))
        )
        .0,
        422
    );
    assert_eq!(
        s.json("POST", "/v1/keys", Some(json!({"name": "x", "scopes": []})))
            .0,
        422
    );
    // revoke: the key stops working at once
    assert_eq!(
        s.json("DELETE", &format!("/v1/keys/{read_id}"), None).0,
        204
    );
    assert_eq!(s.req("GET", "/v1/jobs", Some(&read), None).0, 401);
    assert_eq!(
        s.json("DELETE", &format!("/v1/keys/{read_id}"), None).0,
        404
    );
    // the last admin key cannot be revoked
    let (_, keys) = s.json("GET", "/v1/keys", None);
    let admin_id = keys
        .as_array()
        .and_then(|a| a.iter().find(|k| k["source"] == "bootstrap"))
        .and_then(|k| k["id"].as_str())
        .unwrap_or("")
        .to_string();
    assert_eq!(
        s.json("DELETE", &format!("/v1/keys/{admin_id}"), None).0,
        409
    );
    // every mutation is in the audit trail, with client and outcome
    let (_, a) = s.json("GET", "/v1/audit?limit=200", None);
    let ev = a["events"].as_array().cloned().unwrap_or_default();
    let has = |action: &str, outcome: &str| {
        ev.iter().any(|e| {
            e["action"] == action && e["outcome"].as_str().unwrap_or("").starts_with(outcome)
        })
    };
    assert!(has("key.create", "ok"));
    assert!(has("key.revoke", "ok"));
    assert!(has("key.revoke", "rejected 409"));
    assert!(has("job.create", "accepted"));
    assert!(has("job.create", "denied 403"));
    assert!(ev.iter().all(|e| e["client"] == "127.0.0.1"));
    assert!(
        !a.to_string().contains("avm_"),
        "a secret reached the audit trail"
    );
}

#[test]
fn api_key_file_registers_an_admin_key_without_copying_it() {
    let t = tempdir();
    let kf = t.path().join("provisioned.key");
    std::fs::write(&kf, "avm_provisioned-by-a-secrets-manager-0123456789\n").unwrap();
    let kfs = kf.to_string_lossy().into_owned();
    let s = Server::start(&t.path().join("data"), &["--api-key-file", &kfs]);
    // the provisioned key counts as a key: no bootstrap key is made
    assert!(!s.data.join("admin.key").exists());
    let (code, _, _) = s.req(
        "GET",
        "/v1/keys",
        Some("avm_provisioned-by-a-secrets-manager-0123456789"),
        None,
    );
    assert_eq!(code, 200);
}
