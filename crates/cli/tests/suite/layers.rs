//! A workspace's layers through the real runner: what one run changed,
//! saved as a layer, is what the next run starts from; the repo is never
//! written; a squashed stack shows exactly what the stack showed.

use crate::common::*;

/// `agentvm-run run-request` as `who` with the request `req`.
fn run_as(who: Who, dir: &std::path::Path, req: &serde_json::Value) -> std::process::Output {
    let f = dir.join("request.json");
    std::fs::write(&f, req.to_string()).unwrap();
    let mut c = command_as(who, &bin_dir().join("agentvm-run"));
    c.arg("run-request")
        .arg(&f)
        .stdin(std::process::Stdio::null());
    if who == Who::Nobody {
        c.env("AGENTVM_CGROUP_PARENT", delegated_cgroup());
    }
    c.output().unwrap()
}

#[test]
fn layers_carry_each_runs_changes_to_the_next_and_never_touch_the_repo() {
    for who in runners() {
        let repo = fixture_repo(who);
        let before = manifest(repo.path());
        let out = out_dir(who);
        let o = out.path();
        let store = o.join("layers");
        let s = |p: &str| store.join(p).to_string_lossy().into_owned();
        let path = |p: &str| o.join(p).to_string_lossy().into_owned();
        let r = repo.path().to_string_lossy().into_owned();
        let req = |cmd: &str, stack: &[&str], out_layer: Option<&str>, n: &str| {
            serde_json::json!({
                "command": ["sh", "-c", cmd],
                "repo": {"path": r},
                "stack": stack.iter().map(|l| s(l)).collect::<Vec<_>>(),
                "layer_out": out_layer.map(s),
                "patch_out": path(&format!("patch{n}")),
                "result_json": path(&format!("result{n}")),
            })
        };
        std::fs::create_dir(&store).unwrap();
        if who == Who::Nobody {
            assert!(std::process::Command::new("chown")
                .arg(format!("{NOBODY}:{NOBODY}"))
                .arg(&store)
                .status()
                .unwrap()
                .success());
        }
        // 1: change, add, delete a file and a directory, replace one by a file
        let r1 = run_as(
            who,
            o,
            &req(
                "echo changed > a.txt && echo new > new.txt && rm b.txt && rm -r sub && rm -r olddir && echo file > olddir && mkdir ro && echo r > ro/f && chmod 555 ro",
                &[],
                Some("l1"),
                "1",
            ),
        );
        assert!(r1.status.success(), "{who:?}: {r1:?}");
        // 2: starts from what 1 left; its patch is of its own changes only
        let r2 = run_as(
            who,
            o,
            &req(
                "cat a.txt new.txt olddir ro/f; test ! -e b.txt && test ! -e sub && echo gone; echo more >> new.txt && mkdir sub && echo again > sub/c",
                &["l1"],
                Some("l2"),
                "2",
            ),
        );
        assert!(r2.status.success(), "{who:?}: {r2:?}");
        let said = String::from_utf8_lossy(&r2.stdout);
        assert_eq!(said, "changed\nnew\nfile\nr\ngone\n", "{who:?}: {r2:?}");
        let p2 = std::fs::read_to_string(o.join("patch2")).unwrap();
        assert!(
            p2.contains("+more") && p2.contains(" new\n"),
            "{who:?}: {p2}"
        );
        assert!(
            p2.contains("+++ b/sub/c") && !p2.contains("a.txt"),
            "{who:?}: only run 2's changes: {p2}"
        );
        assert!(
            !p2.contains("sub/deep"),
            "{who:?}: sub was gone before run 2: {p2}"
        );
        // 3: both layers; the view is 1 then 2
        let r3 = run_as(who, o, &req(MANIFEST_SH, &["l2", "l1"], None, "3"));
        assert!(r3.status.success(), "{who:?}: {r3:?}");
        let view = String::from_utf8_lossy(&r3.stdout).into_owned();
        assert!(
            view.contains("F ./new.txt")
                && view.contains("F ./sub/c")
                && !view.contains("sub/deep")
                && !view.contains("b.txt"),
            "{who:?}: {view}"
        );
        assert!(view.contains("F ./olddir "), "{who:?}: {view}");
        // the repo itself is as it was
        assert_eq!(manifest(repo.path()), before, "{who:?}: the repo changed");
        // a squash of the two shows the very same tree
        agentvm_workspace::layer::squash(&store, &["l2".into(), "l1".into()], "sq").unwrap();
        if who == Who::Nobody {
            assert!(std::process::Command::new("chown")
                .args(["-R", &format!("{NOBODY}:{NOBODY}")])
                .arg(&store)
                .status()
                .unwrap()
                .success());
        }
        let r4 = run_as(who, o, &req(MANIFEST_SH, &["sq"], None, "4"));
        assert!(r4.status.success(), "{who:?}: {r4:?}");
        assert_eq!(
            String::from_utf8_lossy(&r4.stdout),
            view,
            "{who:?}: the squash shows another tree"
        );
        // a sparse file takes no room in the sandbox but would be copied
        // whole: refused, and no layer is left
        let r5 = run_as(
            who,
            o,
            &req("truncate -s 5G sparse", &["l2", "l1"], Some("l5"), "5"),
        );
        assert!(!r5.status.success(), "{who:?}: {r5:?}");
        assert!(
            String::from_utf8_lossy(&r5.stderr).contains("too large to keep"),
            "{who:?}: {r5:?}"
        );
        assert!(
            !store.join("l5").exists() && !store.join(".tmp-l5").exists(),
            "{who:?}"
        );
        for l in ["l1", "l2", "sq"] {
            agentvm_workspace::layer::verify(&store, l).unwrap_or_else(|e| panic!("{who:?}: {e}"));
        }
    }
}

#[test]
fn a_bad_stack_is_refused_before_anything_runs() {
    let t = tempdir();
    for (stack, says) in [
        (serde_json::json!(["relative/layer"]), "absolute path"),
        (serde_json::json!(["/x/../etc"]), "absolute path"),
        (serde_json::json!(vec!["/tmp"; 65]), "at most 64"),
    ] {
        let req = serde_json::json!({"command": ["true"], "stack": stack});
        let o = super::cli::run_request(t.path(), &req.to_string());
        assert_eq!(o.status.code(), Some(125), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(says),
            "{says}: {o:?}"
        );
    }
    // a layer that is not there: the runner names it by its id (where
    // the server keeps layers is not for the client)
    let req = serde_json::json!({"command": ["true"], "stack": ["/nonexistent/agentvm-layer"]});
    let o = super::cli::run_request(t.path(), &req.to_string());
    assert_ne!(o.status.code(), Some(0), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("layer agentvm-layer") && !e.contains("/nonexistent"),
        "{o:?}"
    );
}
