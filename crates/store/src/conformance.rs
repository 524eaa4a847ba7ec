//! The behaviour every store must have, as cases any implementation runs
//! unchanged: `cargo test` runs them against SQLite (see sqlite.rs); a
//! second store enables the `conformance` feature in its dev-dependencies
//! and calls [`run_all`] with a way to open a fresh, empty instance.

use std::future::Future;
use std::path::Path;

use crate::*;

/// Run every case, each against a fresh store from `open` (given a
/// scratch directory of its own, which outlives the store).
pub async fn run_all<F, Fut>(open: F)
where
    F: Fn(&Path) -> Fut,
    Fut: Future<Output = Result<Store>>,
{
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {$(
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let s = open(dir.path())
                .await
                .unwrap_or_else(|e| panic!("opening a store for {}: {e}", stringify!($case)));
            $case(&s, dir.path()).await;
            s.close().await;
        )*};
    }
    cases!(
        job_lifecycle_and_recovery,
        patches_are_stored_in_parts_and_read_back_whole,
        audit_fields_are_bounded,
        audit_filters_by_key_action_and_job,
        jobs_list_by_owner_and_logs_by_page,
        hostile_strings_are_data,
        sessions_lifecycle_names_and_recovery,
        workspaces_one_writer_checkpoints_and_layers
    );
}

pub fn new_job(id: &str) -> NewJob {
    NewJob {
        id: id.into(),
        agent: "shell".into(),
        prompt: "echo hi".into(),
        repo_path: "/tmp".into(),
        timeout_s: 60,
        extra_args: vec!["--x".into()],
        key_id: Some("k1".into()),
        network: None,
        image: None,
    }
}

pub async fn job_lifecycle_and_recovery(s: &Store, d: &Path) {
    let a = s
        .create_job(&new_job("a"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let b = s
        .create_job(&NewJob {
            image: Some(format!("sha256:{}", "ab".repeat(32))),
            ..new_job("b")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(a.seq < b.seq);
    // the image a job was accepted with comes back as it was
    assert_eq!(a.image, None);
    let got = s.get_job("b").await.ok().flatten().and_then(|j| j.image);
    assert_eq!(got, b.image);
    assert!(got.is_some_and(|d| d.starts_with("sha256:ab")));
    assert_eq!(a.status, JobStatus::Queued);
    assert!(s.mark_running("a").await.unwrap_or(false));
    assert!(!s.mark_running("a").await.unwrap_or(true), "running twice");
    s.append_log(a.seq, 1, "stdout", b"one")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.append_log(a.seq, 2, "stderr", b"two")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let logs = s.logs(a.seq, 1).await.unwrap_or_default();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].data, b"two");
    // a deleted running job is refused
    assert!(!s.delete_job("a").await.unwrap_or(true));
    // crash: a is interrupted, b stays queued
    let interrupted = s
        .interrupt_running("server restarted")
        .await
        .unwrap_or_default();
    assert_eq!(interrupted.len(), 1);
    let a2 = s
        .get_job("a")
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("a gone"));
    assert_eq!(a2.status, JobStatus::Interrupted);
    assert_eq!(
        s.logs(a.seq, 0).await.unwrap_or_default().len(),
        2,
        "output kept"
    );
    let q = s.queued_jobs().await.unwrap_or_default();
    assert_eq!(
        q.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        vec!["b"]
    );
    // finishing an ended job does nothing
    let f = Finish {
        status: JobStatus::Succeeded,
        exit_code: Some(0),
        error: None,
        result: None,
        patch: Some(b"p".to_vec()),
    };
    assert!(!s.finish_job("a", &f).await.unwrap_or(true));
    assert!(s.finish_job("b", &f).await.unwrap_or(false));
    assert_eq!(
        s.patch("b").await.ok().flatten().flatten(),
        Some(b"p".to_vec())
    );
    assert!(s.delete_job("b").await.unwrap_or(false));
    assert!(s.get_job("b").await.ok().flatten().is_none());
    // retention: the output of ended jobs goes, oldest first, the
    // records stay; a running job's output is kept whatever its age
    let c = s
        .create_job(&new_job("c"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(s.mark_running("c").await.unwrap_or(false));
    s.append_log(c.seq, 1, "stdout", b"live")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(s
        .drop_logs_before(0, 10)
        .await
        .unwrap_or_default()
        .is_empty());
    assert_eq!(
        s.drop_logs_before(i64::MAX, 10).await.unwrap_or_default(),
        vec!["a".to_string()]
    );
    assert!(s.logs(a.seq, 0).await.unwrap_or_default().is_empty());
    assert_eq!(s.logs(c.seq, 0).await.unwrap_or_default().len(), 1);
    assert!(
        s.drop_logs_before(i64::MAX, 10)
            .await
            .unwrap_or_default()
            .is_empty(),
        "once"
    );
    assert!(s.get_job("a").await.ok().flatten().is_some(), "record kept");
    // backup is a consistent, openable copy
    let bk = d.join("backup.sqlite");
    s.backup(&bk).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        std::fs::metadata(&bk).is_ok_and(|m| m.len() > 0),
        "the backup is written"
    );
}

pub async fn patches_are_stored_in_parts_and_read_back_whole(s: &Store, _scratch: &Path) {
    let j = s
        .create_job(&new_job("p"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let patch: Vec<u8> = (0..(PATCH_PART * 2 + 17)).map(|i| i as u8).collect();
    let f = Finish {
        status: JobStatus::Succeeded,
        exit_code: Some(0),
        error: None,
        result: None,
        patch: Some(patch.clone()),
    };
    assert!(s.finish_job("p", &f).await.unwrap_or(false));
    assert_eq!(
        s.patch_size("p").await.ok().flatten(),
        Some((j.seq, Some(patch.len() as i64)))
    );
    assert_eq!(
        s.patch_part(j.seq, 2).await.ok().flatten().map(|p| p.len()),
        Some(17)
    );
    assert_eq!(s.patch_part(j.seq, 3).await.ok().flatten(), None);
    assert_eq!(s.patch("p").await.ok().flatten().flatten(), Some(patch));
    // a job that ended without a patch
    s.create_job(&new_job("q"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let f = Finish { patch: None, ..f };
    assert!(s.finish_job("q", &f).await.unwrap_or(false));
    assert_eq!(s.patch("q").await.ok().flatten(), Some(None));
    assert_eq!(s.patch("nope").await.ok().flatten(), None);
}

pub async fn audit_fields_are_bounded(s: &Store, _scratch: &Path) {
    let long = "é".repeat(40_000);
    s.audit(
        Some(&long),
        &long,
        Some(&long),
        Some(&long),
        &long,
        Some(&long),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let ev = s
        .list_audit(None, 1, &AuditFilter::default())
        .await
        .unwrap_or_default();
    let e = &ev[0];
    assert!(e.target.as_deref().unwrap_or("").len() <= AUDIT_TARGET_MAX);
    assert!(e.detail.as_deref().unwrap_or("").len() <= AUDIT_DETAIL_MAX);
    assert!(e.action.len() <= 64 && e.outcome.len() <= 512);
    assert!(e.target.as_deref().unwrap_or("").ends_with("..."));
}

pub async fn audit_filters_by_key_action_and_job(s: &Store, _scratch: &Path) {
    let add = |k: &'static str,
               a: &'static str,
               t: Option<&'static str>,
               d: Option<&'static str>| async move {
        s.audit(Some(k), a, t, None, "ok", d)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    };
    add("k1", "job.create", Some("job_a1"), None).await;
    add(
        "k1",
        "egress",
        Some("CONNECT h:443"),
        Some("job job_a1; 0 B up, 0 B down"),
    )
    .await;
    add("k2", "job.create", Some("job_b2"), None).await;
    // a job whose id is another's prefix, and one that LIKE would match
    add(
        "k2",
        "egress",
        Some("CONNECT h:443"),
        Some("job job_a12; 1 B up, 0 B down"),
    )
    .await;
    add(
        "k2",
        "egress",
        Some("CONNECT h:443"),
        Some("job jobXa1; 1 B up, 0 B down"),
    )
    .await;
    let f = |k: Option<&str>, a: Option<&str>, j: Option<&str>| AuditFilter {
        key_id: k.map(String::from),
        action: a.map(String::from),
        job: j.map(String::from),
    };
    let seqs = |v: Vec<crate::AuditEvent>| {
        v.iter()
            .map(|e| (e.key_id.clone().unwrap_or_default(), e.action.clone()))
            .collect::<Vec<_>>()
    };
    let all = s
        .list_audit(None, 100, &f(None, None, None))
        .await
        .unwrap_or_default();
    assert_eq!(all.len(), 5);
    let k1 = s
        .list_audit(None, 100, &f(Some("k1"), None, None))
        .await
        .unwrap_or_default();
    assert_eq!(k1.len(), 2);
    let creates = s
        .list_audit(None, 100, &f(None, Some("job.create"), None))
        .await
        .unwrap_or_default();
    assert_eq!(
        seqs(creates),
        [
            ("k2".to_string(), "job.create".to_string()),
            ("k1".into(), "job.create".into())
        ]
    );
    let a1 = s
        .list_audit(None, 100, &f(None, None, Some("job_a1")))
        .await
        .unwrap_or_default();
    assert_eq!(
        seqs(a1),
        [
            ("k1".to_string(), "egress".to_string()),
            ("k1".into(), "job.create".into())
        ]
    );
    let both = s
        .list_audit(None, 100, &f(Some("k2"), Some("egress"), Some("job_a1")))
        .await
        .unwrap_or_default();
    assert!(both.is_empty());
    // paging goes on under a filter
    let first = s
        .list_audit(None, 1, &f(None, None, Some("job_a1")))
        .await
        .unwrap_or_default();
    let next = s
        .list_audit(Some(first[0].seq), 10, &f(None, None, Some("job_a1")))
        .await
        .unwrap_or_default();
    assert_eq!(next.len(), 1);
}

pub async fn jobs_list_by_owner_and_logs_by_page(s: &Store, _scratch: &Path) {
    let a = s
        .create_job(&new_job("a"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut b = new_job("b");
    b.key_id = Some("k2".into());
    s.create_job(&b).await.unwrap_or_else(|e| panic!("{e}"));
    let mine = s
        .list_jobs(Some("k2"), None, None, None, 10)
        .await
        .unwrap_or_default();
    assert_eq!(
        mine.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    assert_eq!(
        s.list_jobs(None, None, None, None, 10)
            .await
            .unwrap_or_default()
            .len(),
        2
    );
    for (i, st) in ["stdout", "egress", "stderr", "stdout"].iter().enumerate() {
        s.append_log(a.seq, i as i64 + 1, st, st.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let page = s
        .logs_page(a.seq, 0, Streams::Output, 2)
        .await
        .unwrap_or_default();
    assert_eq!(page.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 3]);
    let page = s
        .logs_page(a.seq, 3, Streams::Output, 2)
        .await
        .unwrap_or_default();
    assert_eq!(page.iter().map(|c| c.seq).collect::<Vec<_>>(), [4]);
    let only = s
        .logs_page(a.seq, 0, Streams::Only("stderr"), 10)
        .await
        .unwrap_or_default();
    assert_eq!(only.len(), 1);
}

pub async fn hostile_strings_are_data(s: &Store, _scratch: &Path) {
    let evil = "x'); DROP TABLE jobs; --";
    let mut j = new_job(evil);
    j.agent = evil.into();
    s.create_job(&j).await.unwrap_or_else(|e| panic!("{e}"));
    let got = s
        .list_jobs(None, None, Some(evil), None, 10)
        .await
        .unwrap_or_default();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, evil);
}

pub fn new_session(id: &str, owner: &str, name: &str) -> NewSession {
    NewSession {
        id: id.into(),
        name: name.into(),
        owner: owner.into(),
        agent: None,
        command: vec!["bash".into(), "-l".into()],
        repo_path: Some("/srv/repo".into()),
        network: Some(NetworkMode::None),
        idle_timeout_s: 600,
    }
}

/// A live name is its owner's alone until the session ends; ended
/// sessions keep their record; a crash leaves none running.
pub async fn sessions_lifecycle_names_and_recovery(s: &Store, _: &Path) {
    let ok = |r: Result<Session>| r.unwrap_or_else(|e| panic!("{e}"));
    let a = ok(s.create_session(&new_session("s1", "k1", "work")).await);
    assert_eq!(a.status, SessionStatus::Running);
    assert_eq!(a.command, ["bash", "-l"]);
    assert_eq!(a.network, Some(NetworkMode::None));
    // the same name for the same owner, while it lives: taken
    let e = s
        .create_session(&new_session("s2", "k1", "work"))
        .await
        .err()
        .unwrap_or_else(|| panic!("a live name was given twice"));
    assert!(matches!(e, StoreError::Taken(_)), "{e}");
    assert!(
        s.get_session("s2").await.ok().flatten().is_none(),
        "nothing stored"
    );
    // another owner may use it
    ok(s.create_session(&new_session("s3", "k2", "work")).await);
    let live = s.session_named("k1", "work").await.ok().flatten();
    assert_eq!(live.map(|x| x.id), Some("s1".into()));
    assert!(
        !s.delete_session("s1").await.unwrap_or(true),
        "a live session stays"
    );
    assert!(s
        .end_session("s1", SessionStatus::Exited, Some(3), None)
        .await
        .unwrap_or(false));
    assert!(
        !s.end_session("s1", SessionStatus::Killed, None, None)
            .await
            .unwrap_or(true),
        "ends once"
    );
    let ended = s
        .get_session("s1")
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("gone"));
    assert_eq!(
        (ended.status, ended.exit_code),
        (SessionStatus::Exited, Some(3))
    );
    assert!(ended.ended_at.is_some());
    let named = s.session_named("k1", "work").await.ok().flatten();
    assert_eq!(
        named.map(|x| x.id),
        Some("s1".into()),
        "the ended one, when no live one"
    );
    // the name is free again, and finds the live one first
    ok(s.create_session(&new_session("s4", "k1", "work")).await);
    let named = s.session_named("k1", "work").await.ok().flatten();
    assert_eq!(named.map(|x| x.id), Some("s4".into()));
    let mine = s
        .list_sessions(Some("k1"), None, 10)
        .await
        .unwrap_or_default();
    assert_eq!(
        mine.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
        ["s4", "s1"],
        "newest first, the owner's only"
    );
    let page = s
        .list_sessions(None, Some(mine[0].seq), 10)
        .await
        .unwrap_or_default();
    assert!(page.iter().all(|x| x.seq < mine[0].seq));
    s.set_session_supervisor("s4", 4242, 99)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let lost = s
        .interrupt_sessions("the server stopped")
        .await
        .unwrap_or_default();
    let mut ids: Vec<&str> = lost.iter().map(|x| x.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["s3", "s4"]);
    assert_eq!(
        lost.iter()
            .find(|x| x.id == "s4")
            .and_then(|x| x.supervisor_pid),
        Some(4242)
    );
    for id in ["s3", "s4"] {
        let x = s
            .get_session(id)
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("{id}"));
        assert_eq!(x.status, SessionStatus::Interrupted);
        assert_eq!(x.error.as_deref(), Some("the server stopped"));
    }
    // a patch is kept for an ended session only
    assert_eq!(s.session_patch("s1").await.ok().flatten(), Some(None));
    s.set_session_patch("s1", b"diff --git a/x b/x\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        s.session_patch("s1")
            .await
            .ok()
            .flatten()
            .flatten()
            .as_deref(),
        Some(&b"diff --git a/x b/x\n"[..])
    );
    s.set_session_patch("s4", b"x").await.ok();
    assert_eq!(s.session_patch("nope").await.ok().flatten(), None);
    assert!(s.delete_session("s1").await.unwrap_or(false));
    assert!(s.get_session("s1").await.ok().flatten().is_none());
}

pub async fn workspaces_one_writer_checkpoints_and_layers(s: &Store, _: &Path) {
    fn ok<T>(r: Result<T>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }
    fn some<T>(r: Result<Option<T>>) -> T {
        ok(r).unwrap_or_else(|| panic!("not found"))
    }
    let nw = |id: &str, name: &str, owner: &str| NewWorkspace {
        id: id.into(),
        name: name.into(),
        owner: owner.into(),
        repo_path: "/r".into(),
        stack: vec![],
        image: None,
    };
    let w = ok(s.create_workspace(&nw("ws_1", "main", "k1")).await);
    assert!(w.stack.is_empty() && w.writer.is_none() && w.image.is_none());
    // the image it was made with comes back as it was
    let digest = format!("sha256:{}", "cd".repeat(32));
    let wi = ok(s
        .create_workspace(&NewWorkspace {
            image: Some(digest.clone()),
            ..nw("ws_img", "with-image", "k-img")
        })
        .await);
    assert_eq!(wi.image.as_deref(), Some(digest.as_str()));
    assert_eq!(some(s.get_workspace("ws_img").await).image, Some(digest));
    assert!(ok(s.delete_workspace("ws_img").await));
    assert!(matches!(
        s.create_workspace(&nw("ws_2", "main", "k1")).await,
        Err(StoreError::Taken(_))
    ));
    ok(s.create_workspace(&nw("ws_3", "main", "k2")).await);
    assert_eq!(ok(s.list_workspaces(Some("k1")).await).len(), 1);
    assert_eq!(ok(s.list_workspaces(None).await).len(), 2);
    assert_eq!(some(s.workspace_named("k2", "main").await).id, "ws_3");
    // one writer
    assert!(ok(s.take_workspace("ws_1", "job_a").await));
    assert!(!ok(s.take_workspace("ws_1", "job_b").await));
    assert_eq!(some(s.workspace_of_writer("job_a").await).id, "ws_1");
    assert!(
        !ok(s.set_workspace_stack("ws_1", &["x".into()]).await),
        "busy"
    );
    assert!(!ok(s.delete_workspace("ws_1").await), "busy");
    assert!(
        !ok(s.release_workspace("ws_1", "job_b", None).await),
        "not its writer"
    );
    let l = vec!["l1".to_string()];
    assert!(ok(s.release_workspace("ws_1", "job_a", Some(&l)).await));
    let w = some(s.get_workspace("ws_1").await);
    assert_eq!((w.stack.clone(), w.writer.clone()), (l.clone(), None));
    // a release without a stack keeps the one there
    assert!(ok(s.take_workspace("ws_1", "job_c").await));
    assert!(ok(s.release_workspace("ws_1", "job_c", None).await));
    assert_eq!(some(s.get_workspace("ws_1").await).stack, l);
    // checkpoints
    let cp = |id: &str, name: &str, stack: &[&str]| NewCheckpoint {
        id: id.into(),
        workspace_id: "ws_1".into(),
        name: name.into(),
        stack: stack.iter().map(|x| x.to_string()).collect(),
    };
    ok(s.create_checkpoint(&cp("cp_1", "one", &["l1"])).await);
    assert!(matches!(
        s.create_checkpoint(&cp("cp_2", "one", &[])).await,
        Err(StoreError::Taken(_))
    ));
    ok(s.create_checkpoint(&cp("cp_3", "two", &["l2", "l1"])).await);
    assert_eq!(
        some(s.checkpoint_named("ws_1", "two").await).stack,
        ["l2", "l1"]
    );
    assert_eq!(ok(s.list_checkpoints("ws_1").await).len(), 2);
    assert!(ok(s.set_workspace_stack("ws_3", &["l9".into()]).await));
    assert_eq!(ok(s.layers_in_use().await), ["l1", "l2", "l9"]);
    assert!(ok(s.delete_checkpoint("cp_3").await));
    assert!(!ok(s.delete_checkpoint("cp_3").await));
    assert_eq!(ok(s.layers_in_use().await), ["l1", "l9"]);
    // a reader keeps the stack it reads in use, beside any writer
    let read = vec!["l7".to_string(), "l1".to_string()];
    ok(s.add_reader("job_r", "ws_1", &read).await);
    assert!(matches!(
        s.add_reader("job_r", "ws_1", &[]).await,
        Err(StoreError::Taken(_))
    ));
    assert_eq!(
        ok(s.reader_stack("job_r").await),
        Some(("ws_1".to_string(), read.clone()))
    );
    assert_eq!(ok(s.reader_stack("job_a").await), None);
    assert_eq!(ok(s.list_readers().await), ["job_r"]);
    assert_eq!(ok(s.layers_in_use().await), ["l1", "l7", "l9"]);
    // deleting a workspace takes its checkpoints along, not its readers
    assert!(ok(s.delete_workspace("ws_1").await));
    assert!(ok(s.get_checkpoint("cp_1").await).is_none());
    assert_eq!(ok(s.layers_in_use().await), ["l1", "l7", "l9"]);
    assert!(ok(s.drop_reader("job_r").await));
    assert!(!ok(s.drop_reader("job_r").await));
    assert_eq!(ok(s.layers_in_use().await), ["l9"]);
}
