//! How a job ended, decided from what its runner reported: a pure function
//! of the typed result, the runner's exit status, what the server did to
//! the job (cancel, shutdown) and the patch's size, so every case is a unit
//! test without a sandbox.

use agentvm_proto::{RunResult, RunStatus};
use agentvm_store::JobStatus;

/// Everything the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Ending<'a> {
    /// What the runner wrote (`None`: nothing readable).
    pub result: Option<&'a RunResult>,
    /// The runner process's own exit status.
    pub exit_status: Option<i32>,
    pub cancelled: bool,
    /// The server shut down under it.
    pub interrupted: bool,
    pub timeout_s: i64,
    /// The largest patch the server keeps.
    pub max_patch: u64,
    /// The size of the patch file the runner left, if any.
    pub patch_len: Option<u64>,
    /// What the workspace's quotas left the job, and why in words: the
    /// reason given when that is what its disk limit came to.
    pub quota: Option<(u64, &'a str)>,
}

/// The job's final status, its error, and whether its patch is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub status: JobStatus,
    pub error: Option<String>,
    pub keep_patch: bool,
}

pub fn verdict(e: &Ending) -> Verdict {
    let (status, error) = if e.interrupted {
        (
            JobStatus::Interrupted,
            Some("interrupted: the server shut down".to_string()),
        )
    } else if e.cancelled {
        (JobStatus::Cancelled, Some("cancelled".to_string()))
    } else if let Some(r) = e.result {
        match r.status {
            RunStatus::Timeout => (
                JobStatus::TimedOut,
                Some(format!("timed out after {} seconds", e.timeout_s)),
            ),
            RunStatus::Exited if r.exit_code == 0 => (JobStatus::Succeeded, None),
            RunStatus::Exited => (
                JobStatus::Failed,
                Some(format!("exited with status {}", r.exit_code)),
            ),
            RunStatus::Oom => (JobStatus::Failed, Some("killed: out of memory".into())),
            RunStatus::Signaled => (
                JobStatus::Failed,
                Some(format!("killed by signal {}", r.signal.unwrap_or(0))),
            ),
            RunStatus::Error => (
                JobStatus::Failed,
                Some(match &r.error {
                    Some(x) => format!("{}: {}", x.layer, x.message),
                    None => "the sandbox could not be set up".into(),
                }),
            ),
        }
    } else {
        (
            JobStatus::Failed,
            Some(format!(
                "the sandbox ended without a result (exit status {:?})",
                e.exit_status
            )),
        )
    };
    // a full disk is why a command fails more often than not: say so,
    // and what set the limit
    let error = match (e.result, error) {
        (Some(r), Some(x)) if r.disk_full => Some(
            match (
                e.quota
                    .filter(|(left, _)| r.disk_limit_bytes == Some(*left))
                    .map(|(_, why)| why),
                r.disk_limit_bytes,
            ) {
                (Some(why), Some(n)) => format!("{x}; its disk ({n} bytes) was full: {why}"),
                (Some(why), None) => format!("{x}; its disk was full: {why}"),
                (None, Some(n)) => {
                    format!("{x}; its disk ({n} bytes, its profile's or request's limit) was full")
                }
                (None, None) => format!("{x}; its disk was full"),
            },
        ),
        (_, error) => error,
    };
    // the runner stopped writing a patch past the limit: that is the whole
    // story; a larger file than the server keeps is not read either
    let from_runner = e.result.is_some_and(|r| r.patch_too_large);
    let over = e.patch_len.filter(|&n| n > e.max_patch);
    if !from_runner && over.is_none() {
        return Verdict {
            status,
            error,
            keep_patch: true,
        };
    }
    let note = match over {
        Some(n) => format!(
            "the patch is {n} bytes, more than the server keeps ({} bytes, --max-patch); it was not stored",
            e.max_patch
        ),
        None => format!(
            "the patch is more than the server keeps ({} bytes, --max-patch); it was not stored",
            e.max_patch
        ),
    };
    let status = match status {
        JobStatus::Succeeded => JobStatus::Failed,
        s => s,
    };
    let error = match error {
        Some(x) if !from_runner => format!("{x}; {note}"),
        _ => note,
    };
    Verdict {
        status,
        error: Some(error),
        keep_patch: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_proto::{RunErrorInfo, RunRequest};

    fn result(status: RunStatus, code: i32) -> RunResult {
        let mut r = RunResult::setup_failed(&RunRequest::new(vec!["true".into()]), code);
        r.status = status;
        r
    }

    fn ending(r: Option<&RunResult>) -> Ending<'_> {
        Ending {
            result: r,
            exit_status: Some(0),
            cancelled: false,
            interrupted: false,
            timeout_s: 30,
            max_patch: 100,
            patch_len: Some(10),
            quota: None,
        }
    }

    fn judge(e: Ending) -> (JobStatus, String, bool) {
        let v = verdict(&e);
        (v.status, v.error.unwrap_or_default(), v.keep_patch)
    }

    #[test]
    fn a_full_disk_is_said_with_what_set_its_size() {
        let mut full = result(RunStatus::Exited, 1);
        full.disk_full = true;
        full.disk_limit_bytes = Some(2048);
        assert_eq!(
            judge(ending(Some(&full))).1,
            "exited with status 1; its disk (2048 bytes, its profile's or request's limit) was full"
        );
        let e = Ending {
            quota: Some((2048, "workspace w holds 1 bytes of its quota of 9")),
            ..ending(Some(&full))
        };
        assert_eq!(
            judge(e).1,
            "exited with status 1; its disk (2048 bytes) was full: workspace w holds 1 bytes of its quota of 9"
        );
        // a quota that left more than the profile's limit is not the reason
        let e = Ending {
            quota: Some((4096, "workspace w holds 1 bytes of its quota of 9")),
            ..ending(Some(&full))
        };
        assert!(judge(e)
            .1
            .ends_with("its profile's or request's limit) was full"));
        // a command that coped with it succeeded: nothing to say
        let mut coped = result(RunStatus::Exited, 0);
        coped.disk_full = true;
        assert_eq!(judge(ending(Some(&coped))).1, "");
    }

    #[test]
    fn each_way_a_run_ends() {
        use JobStatus::*;
        let ok = result(RunStatus::Exited, 0);
        assert_eq!(judge(ending(Some(&ok))), (Succeeded, String::new(), true));
        let three = result(RunStatus::Exited, 3);
        assert_eq!(judge(ending(Some(&three))).1, "exited with status 3");
        let t = result(RunStatus::Timeout, 124);
        assert_eq!(judge(ending(Some(&t))).0, TimedOut);
        assert_eq!(judge(ending(Some(&t))).1, "timed out after 30 seconds");
        let oom = result(RunStatus::Oom, 137);
        assert_eq!(judge(ending(Some(&oom))).1, "killed: out of memory");
        let mut sig = result(RunStatus::Signaled, 143);
        sig.signal = Some(15);
        assert_eq!(judge(ending(Some(&sig))).1, "killed by signal 15");
        let mut err = result(RunStatus::Error, 125);
        err.error = Some(RunErrorInfo {
            layer: "mounts".into(),
            message: "no overlay".into(),
        });
        assert_eq!(
            judge(ending(Some(&err))),
            (Failed, "mounts: no overlay".into(), true)
        );
        let mut none = ending(None);
        none.exit_status = Some(1);
        assert_eq!(
            judge(none).1,
            "the sandbox ended without a result (exit status Some(1))"
        );
    }

    #[test]
    fn what_the_server_did_comes_first() {
        let ok = result(RunStatus::Exited, 0);
        let mut e = ending(Some(&ok));
        e.cancelled = true;
        assert_eq!(judge(e).0, JobStatus::Cancelled);
        e.interrupted = true;
        assert_eq!(judge(e).0, JobStatus::Interrupted);
    }

    #[test]
    fn a_patch_past_the_limit_is_not_kept_and_fails_the_job() {
        let ok = result(RunStatus::Exited, 0);
        let mut e = ending(Some(&ok));
        e.patch_len = Some(101);
        assert_eq!(
            judge(e),
            (
                JobStatus::Failed,
                "the patch is 101 bytes, more than the server keeps (100 bytes, --max-patch); it was not stored".into(),
                false
            )
        );
        // the runner's own refusal: only the note, whatever it says else
        let mut big = result(RunStatus::Error, 125);
        big.patch_too_large = true;
        big.error = Some(RunErrorInfo {
            layer: "capture".into(),
            message: "too large".into(),
        });
        let mut e = ending(Some(&big));
        e.patch_len = Some(0);
        let (st, err, keep) = judge(e);
        assert_eq!((st, keep), (JobStatus::Failed, false));
        assert!(
            err.starts_with("the patch is more than the server keeps"),
            "{err}"
        );
        // a failed job keeps its own reason too
        let three = result(RunStatus::Exited, 3);
        let mut e = ending(Some(&three));
        e.patch_len = Some(500);
        assert!(judge(e)
            .1
            .starts_with("exited with status 3; the patch is 500 bytes"));
        // exactly at the limit is kept
        let mut e = ending(Some(&ok));
        e.patch_len = Some(100);
        assert!(judge(e).2);
    }
}
