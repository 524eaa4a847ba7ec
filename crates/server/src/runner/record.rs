//! What comes back from a job's runner: output redacted, stored within
//! the limit and fanned out; egress decisions stored, streamed and audited;
//! at the end the typed result, the patch, the verdict and the last audit
//! rows.

use super::*;

impl Runner {
    /// Store one piece of output, then fan it out to followers.
    pub(super) async fn emit(
        &self,
        job: &Job,
        tx: &broadcast::Sender<Live>,
        seq: &mut i64,
        stream: &str,
        data: Vec<u8>,
    ) {
        if data.is_empty() {
            return;
        }
        *seq += 1;
        if let Err(e) = self.store.append_log(job.seq, *seq, stream, &data).await {
            tracing::error!(job = %job.id, error = %e, "storing output failed");
        }
        let _ = tx.send(Live::Chunk(LogChunk {
            seq: *seq,
            stream: stream.into(),
            ts: agentvm_store::now_ms(),
            data,
        }));
    }

    /// One line from the egress event pipe: redact it, store it among the
    /// job's output as stream "egress" (followers get it live, and again
    /// on reconnect), and audit it once it is final.
    pub(super) async fn egress_decision(
        &self,
        job: &Job,
        line: &[u8],
        audited: &mut std::collections::HashSet<u64>,
        tx: &broadcast::Sender<Live>,
        seq: &mut i64,
    ) {
        let text = self.redactor.redact_str(&String::from_utf8_lossy(line));
        let Some(parsed) = EgressLine::parse(text.as_bytes()) else {
            return;
        };
        if let EgressLine::Record(e) = &parsed {
            if e.phase == Phase::Closed && audited.insert(e.conn) {
                self.audit_egress(job, e).await;
            }
        }
        let Ok(stored) = serde_json::to_vec(&parsed) else {
            return;
        };
        self.emit(job, tx, seq, "egress", stored).await;
    }

    /// A record with every secret the server knows redacted.
    pub(super) fn redacted(&self, e: &EgressRecord) -> EgressRecord {
        let mut e = e.clone();
        for s in [&mut e.method, &mut e.host] {
            *s = self.redactor.redact_str(s);
        }
        for s in [e.reason.as_mut(), e.address.as_mut()]
            .into_iter()
            .flatten()
        {
            *s = self.redactor.redact_str(s);
        }
        e
    }

    /// An egress decision as an audit row, under the job's key.
    pub(super) async fn audit_egress(&self, job: &Job, e: &EgressRecord) {
        let (target, outcome) = (e.target(), e.outcome());
        let detail = format!(
            "job {}; {} B up, {} B down",
            job.id, e.bytes_up, e.bytes_down
        );
        let _ = self
            .store
            .audit(
                job.key_id.as_deref(),
                "egress",
                Some(&target),
                None,
                &outcome,
                Some(&detail),
            )
            .await;
    }

    /// Connections past the proxy's record limit: one audit row.
    pub(super) async fn audit_unrecorded(&self, job: &Job, u: Unrecorded) {
        let outcome = format!(
            "not recorded one by one: {} allowed, {} refused (past the first {} connections)",
            u.allowed, u.refused, u.limit
        );
        let detail = format!("job {}; counted, not recorded", job.id);
        let _ = self
            .store
            .audit(
                job.key_id.as_deref(),
                "egress",
                None,
                None,
                &outcome,
                Some(&detail),
            )
            .await;
    }

    /// Pump output as it arrives until the runner's pipes close: redact,
    /// store within the output limit, then fan out; egress decisions from
    /// their pipe are stored, streamed and audited as they come. Returns
    /// whether output was cut, and the connections already audited.
    pub(super) async fn pump(
        &self,
        job: &Job,
        tx: &broadcast::Sender<Live>,
        mut out: Option<tokio::process::ChildStdout>,
        mut err: Option<tokio::process::ChildStderr>,
        events: Option<std::os::fd::OwnedFd>,
    ) -> (bool, std::collections::HashSet<u64>) {
        let mut seq: i64 = 0;
        let mut buf_o = vec![0u8; 32 * 1024];
        let mut buf_e = vec![0u8; 32 * 1024];
        // secrets never reach the store or a follower: redact first
        let (mut red_o, mut red_e) = (self.redactor.stream(), self.redactor.stream());
        let mut ev = events.and_then(|r| tokio::net::unix::pipe::Receiver::from_owned_fd(r).ok());
        let (mut buf_ev, mut ev_line) = (vec![0u8; 8 * 1024], Vec::<u8>::new());
        let mut audited = std::collections::HashSet::new();
        let (mut kept, mut truncated) = (0u64, false);
        let mut ev_lines = 0u64;
        while out.is_some() || err.is_some() || ev.is_some() {
            // once the output has ended, the proxy's last lines are due at once
            let output_done = out.is_none() && err.is_none();
            let (stream, n) = tokio::select! {
                r = async { match out.as_mut() { Some(o) => o.read(&mut buf_o).await, None => std::future::pending().await } } => ("stdout", r),
                r = async { match err.as_mut() { Some(e) => e.read(&mut buf_e).await, None => std::future::pending().await } } => ("stderr", r),
                r = async {
                    match ev.as_mut() {
                        Some(e) if output_done => tokio::time::timeout(Duration::from_secs(2), e.read(&mut buf_ev)).await.unwrap_or(Ok(0)),
                        Some(e) => e.read(&mut buf_ev).await,
                        None => std::future::pending().await,
                    }
                } => ("egress", r),
            };
            if stream == "egress" {
                match n {
                    Ok(0) | Err(_) => ev = None,
                    Ok(n) => {
                        ev_line.extend_from_slice(&buf_ev[..n]);
                        while let Some(i) = ev_line.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = ev_line.drain(..=i).collect();
                            // the proxy writes at most two lines per recorded
                            // connection and a few counts; it parses what the
                            // sandbox sends, so it is not trusted to keep to that
                            ev_lines += 1;
                            if ev_lines
                                > self
                                    .cfg
                                    .egress_record_limit
                                    .saturating_mul(2)
                                    .saturating_add(64)
                            {
                                continue;
                            }
                            self.egress_decision(job, &line, &mut audited, tx, &mut seq)
                                .await;
                        }
                        if ev_line.len() > 1 << 20 {
                            // not a line of ours; the result still has them all
                            ev_line.clear();
                        }
                    }
                }
                continue;
            }
            let data = match n {
                Ok(0) | Err(_) => {
                    if stream == "stdout" {
                        out = None;
                        red_o.finish()
                    } else {
                        err = None;
                        red_e.finish()
                    }
                }
                Ok(n) if stream == "stdout" => red_o.push(&buf_o[..n]),
                Ok(n) => red_e.push(&buf_e[..n]),
            };
            // past the output limit, the pipes are still drained (the
            // command must not block) but nothing more is kept
            if data.is_empty() || truncated {
                continue;
            }
            let room =
                usize::try_from(self.cfg.max_output.saturating_sub(kept)).unwrap_or(usize::MAX);
            let over = data.len() > room;
            let data = if over { data[..room].to_vec() } else { data };
            kept += data.len() as u64;
            self.emit(job, tx, &mut seq, stream, data).await;
            if over {
                truncated = true;
                let note = format!(
                    "\n[agentvm: this job's output passed the server's limit of {} bytes; the rest was discarded]\n",
                    self.cfg.max_output
                );
                self.emit(job, tx, &mut seq, "stderr", note.into_bytes())
                    .await;
            }
        }
        (truncated, audited)
    }

    /// The job's end from what the runner left: its typed result, its
    /// patch (within the limit), the verdict, the remaining audit rows, and
    /// everything redacted.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn conclude(
        &self,
        job: &Job,
        dir: &std::path::Path,
        status: std::io::Result<std::process::ExitStatus>,
        cancelled: &AtomicBool,
        interrupted: &AtomicBool,
        (truncated, quota): (bool, Option<(u64, &str)>),
        audited: std::collections::HashSet<u64>,
    ) -> Finish {
        // what the runner says, typed; anything else is no result at all
        let result: Option<RunResult> = std::fs::read(dir.join("result.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let patch_len = std::fs::metadata(dir.join("patch")).map(|m| m.len()).ok();
        let code = status.as_ref().ok().and_then(|s| s.code());
        let exit_code = result
            .as_ref()
            .map(|r| i64::from(r.exit_code))
            .or(code.map(i64::from));
        let v = crate::verdict::verdict(&crate::verdict::Ending {
            result: result.as_ref(),
            exit_status: code,
            cancelled: cancelled.load(Ordering::SeqCst),
            interrupted: interrupted.load(Ordering::SeqCst),
            timeout_s: job.timeout_s,
            max_patch: self.cfg.max_patch,
            patch_len,
            quota,
        });
        // a patch past the limit is not written by the runner, nor read here
        let patch = match v.keep_patch {
            true => std::fs::read(dir.join("patch")).ok(),
            false => None,
        };
        let (st, error) = (v.status, v.error);
        // every egress decision joins the audit trail: those not yet
        // audited live (a line the pipe dropped, a connection still open)
        if let Some(eg) = result.as_ref().and_then(|r| r.egress.as_ref()) {
            for e in eg.iter().filter(|e| !audited.contains(&e.conn)) {
                self.audit_egress(job, &self.redacted(e)).await;
            }
        }
        // past the proxy's record limit: one row with the counts
        if let Some(u) = result.as_ref().and_then(|r| r.egress_unrecorded) {
            self.audit_unrecorded(job, u).await;
        }
        // nothing a job produced keeps a secret
        let r = &self.redactor;
        let result = result.map(|res| {
            let mut v = serde_json::to_string(&res)
                .ok()
                .and_then(|t| serde_json::from_str(&r.redact_str(&t)).ok())
                .unwrap_or(serde_json::Value::Null);
            if truncated {
                if let Some(o) = v.as_object_mut() {
                    o.insert("output_truncated".into(), serde_json::Value::Bool(true));
                }
            }
            v
        });
        Finish {
            status: st,
            exit_code,
            error: error.map(|e| r.redact_str(&e)),
            result,
            patch: patch.map(|p| r.redact(&p)),
        }
    }
}
