//! What a session's viewers see, whichever door they came in by: the last
//! bytes of output for one who attaches late (bounded), then live output;
//! several viewers at once, one writer at a time.
//!
//! Memory is bounded whatever viewers do: the replay is a fixed ring, and
//! each viewer has a queue of a fixed number of pieces; one that falls
//! that far behind is dropped (its door says so) and the session goes on.
//! Pushing never waits for a viewer.
//!
//! The replay is cut at a byte count, so it may start inside a UTF-8
//! character or an escape sequence: terminals recover from both within a
//! line, and the server never interprets what it holds.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

/// Bytes of recent output a late viewer is shown first.
pub const REPLAY: usize = 64 * 1024;
/// Pieces of output a viewer may have unread before it is dropped.
pub const VIEWER_QUEUE: usize = 256;

/// One thing a viewer receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Output(Arc<[u8]>),
    /// The session ended with this exit status (`None`: killed, lost).
    End(Option<i32>),
    /// The session was paused (true) or resumed (false).
    Paused(bool),
}

/// Why an attach was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachError {
    Ended,
    /// At most this many viewers at once.
    Full(usize),
}

/// A viewer's end: the replay first, then frames; `writer` says whether
/// its input counts.
pub struct Attached {
    pub id: u64,
    pub replay: Vec<u8>,
    pub frames: mpsc::Receiver<Frame>,
    lagged: Arc<AtomicBool>,
}

impl Attached {
    /// The frames stopped because this viewer fell too far behind (not
    /// because the session ended or the viewer was detached).
    pub fn lagged(&self) -> bool {
        self.lagged.load(Ordering::SeqCst)
    }
}

/// A viewer whose queue was full, with the frame it still needs.
struct Late {
    id: u64,
    tx: mpsc::Sender<Frame>,
    frame: Frame,
}

struct Viewer {
    tx: mpsc::Sender<Frame>,
    lagged: Arc<AtomicBool>,
    who: String,
}

struct Inner {
    replay: VecDeque<u8>,
    viewers: HashMap<u64, Viewer>,
    writer: Option<u64>,
    next: u64,
    ended: Option<Option<i32>>,
    /// Paused: nobody's input counts (the writer keeps the role for when
    /// it resumes).
    paused: bool,
    /// Viewers that asked to write while paused with nobody writing: the
    /// first still here writes at resume.
    wants: Vec<u64>,
}

/// A session's screen.
pub struct Screen {
    inner: Mutex<Inner>,
    replay_cap: usize,
    queue: usize,
    max_viewers: usize,
}

impl Screen {
    pub fn new(replay_cap: usize, queue: usize, max_viewers: usize) -> Screen {
        Screen {
            inner: Mutex::new(Inner {
                replay: VecDeque::with_capacity(replay_cap.min(REPLAY)),
                viewers: HashMap::new(),
                writer: None,
                next: 1,
                ended: None,
                paused: false,
                wants: Vec::new(),
            }),
            replay_cap,
            queue: queue.max(1),
            max_viewers,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Output from the session: kept for the replay and sent to every
    /// viewer; one whose queue is full is dropped at once (see [`offer`]
    /// for the grace the terminal gives).
    ///
    /// [`offer`]: Screen::offer
    pub fn push(&self, bytes: &[u8]) {
        for l in self.fan_out(bytes) {
            self.drop_lagged(l.id);
        }
    }

    /// Output from the session, as the terminal sends it: a viewer whose
    /// queue is full is waited for, up to `grace`, while nothing more is
    /// read from the session (its program blocks on its terminal, as
    /// with a slow ssh client); one that takes no frame within `grace` is
    /// dropped and the rest go on. A viewer that reads steadily, however
    /// slowly, is never dropped; one that stops reading costs the
    /// session at most `grace`.
    pub async fn offer(&self, bytes: &[u8], grace: std::time::Duration) {
        for l in self.fan_out(bytes) {
            let sent = tokio::time::timeout(grace, l.tx.send(l.frame)).await;
            if !matches!(sent, Ok(Ok(()))) {
                self.drop_lagged(l.id);
            }
        }
    }

    fn drop_lagged(&self, id: u64) {
        let mut g = self.lock();
        if let Some(v) = g.viewers.get(&id) {
            v.lagged.store(true, Ordering::SeqCst);
        }
        Self::remove(&mut g, id);
    }

    /// Keep `bytes` for the replay and queue them for every viewer with
    /// room; the ones without are returned with their frame.
    fn fan_out(&self, bytes: &[u8]) -> Vec<Late> {
        if bytes.is_empty() {
            return Vec::new();
        }
        let mut g = self.lock();
        if g.ended.is_some() {
            return Vec::new();
        }
        let keep = bytes.len().min(self.replay_cap);
        let over = (g.replay.len() + keep).saturating_sub(self.replay_cap);
        g.replay.drain(..over);
        g.replay.extend(&bytes[bytes.len() - keep..]);
        let piece: Arc<[u8]> = Arc::from(bytes);
        let mut late = Vec::new();
        for (id, v) in &g.viewers {
            if let Err(mpsc::error::TrySendError::Full(frame)) =
                v.tx.try_send(Frame::Output(piece.clone()))
            {
                late.push(Late {
                    id: *id,
                    tx: v.tx.clone(),
                    frame,
                });
            }
        }
        late
    }

    /// Attach `who`: the replay and the live frames after it, with no
    /// byte lost or repeated between the two. The first viewer (or one
    /// asking for it when nobody writes) is the writer.
    pub fn attach(&self, who: &str, want_write: bool) -> Result<(Attached, bool), AttachError> {
        let mut g = self.lock();
        if g.ended.is_some() {
            return Err(AttachError::Ended);
        }
        if g.viewers.len() >= self.max_viewers {
            return Err(AttachError::Full(self.max_viewers));
        }
        let id = g.next;
        g.next += 1;
        let (tx, rx) = mpsc::channel(self.queue);
        let lagged = Arc::new(AtomicBool::new(false));
        g.viewers.insert(
            id,
            Viewer {
                tx,
                lagged: lagged.clone(),
                who: who.to_string(),
            },
        );
        let writer = want_write && g.writer.is_none() && !g.paused;
        if want_write && g.writer.is_none() && g.paused {
            g.wants.push(id);
        }
        if writer {
            g.writer = Some(id);
        }
        let replay = g.replay.iter().copied().collect();
        Ok((
            Attached {
                id,
                replay,
                frames: rx,
                lagged,
            },
            writer,
        ))
    }

    fn remove(g: &mut Inner, id: u64) {
        g.viewers.remove(&id);
        g.wants.retain(|w| *w != id);
        if g.writer == Some(id) {
            g.writer = None;
        }
    }

    /// The viewer goes away; if it was the writer, nobody writes until
    /// another takes over.
    pub fn detach(&self, id: u64) {
        Self::remove(&mut self.lock(), id);
    }

    /// Does anyone write now?
    pub fn has_writer(&self) -> bool {
        self.lock().writer.is_some()
    }

    /// May viewer `id`'s input reach the session?
    pub fn may_write(&self, id: u64) -> bool {
        let g = self.lock();
        g.writer == Some(id) && !g.paused
    }

    /// Does viewer `id` hold the writer's role (whether or not the
    /// session is paused)?
    pub fn is_writer(&self, id: u64) -> bool {
        self.lock().writer == Some(id)
    }

    /// Is the session paused?
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// The session was paused or resumed: every viewer is told (one whose
    /// queue is full is behind anyway, and is dropped by the next output).
    pub fn set_paused(&self, paused: bool) {
        let mut g = self.lock();
        if g.ended.is_some() || g.paused == paused {
            return;
        }
        g.paused = paused;
        let wants = std::mem::take(&mut g.wants);
        if !paused && g.writer.is_none() {
            g.writer = wants.into_iter().find(|w| g.viewers.contains_key(w));
        }
        for v in g.viewers.values() {
            let _ = v.tx.try_send(Frame::Paused(paused));
        }
    }

    /// Viewer `id` becomes the writer (the previous one reads only).
    /// False if `id` is not attached or the session is paused.
    pub fn take_over(&self, id: u64) -> bool {
        let mut g = self.lock();
        if !g.viewers.contains_key(&id) || g.paused {
            return false;
        }
        g.writer = Some(id);
        true
    }

    /// Who is watching, and which of them writes.
    pub fn viewers(&self) -> Vec<(u64, String, bool)> {
        let g = self.lock();
        let mut v: Vec<_> = g
            .viewers
            .iter()
            .map(|(id, v)| (*id, v.who.clone(), g.writer == Some(*id)))
            .collect();
        v.sort();
        v
    }

    /// The session ended: every viewer gets `End` (if its queue has room;
    /// a full one sees its frames stop) and is let go; later attaches are
    /// refused.
    /// Has the session ended (its viewers got, or will get, its end)?
    pub fn has_ended(&self) -> bool {
        self.lock().ended.is_some()
    }

    pub fn end(&self, status: Option<i32>) {
        let mut g = self.lock();
        if g.ended.is_some() {
            return;
        }
        g.ended = Some(status);
        for v in g.viewers.values() {
            let _ = v.tx.try_send(Frame::End(status));
        }
        g.viewers.clear();
        g.writer = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(a: &mut Attached) -> (Vec<u8>, Option<Option<i32>>) {
        let mut out = Vec::new();
        let mut end = None;
        while let Ok(f) = a.frames.try_recv() {
            match f {
                Frame::Output(b) => out.extend_from_slice(&b),
                Frame::End(s) => end = Some(s),
                Frame::Paused(_) => {}
            }
        }
        (out, end)
    }

    #[test]
    fn paused_nobody_writes_and_who_asked_writes_at_resume() {
        let s = Screen::new(64, 4, 4);
        let (mut w, writes) = s.attach("w", true).unwrap();
        assert!(writes);
        s.set_paused(true);
        assert_eq!(w.frames.try_recv().ok(), Some(Frame::Paused(true)));
        assert!(!s.may_write(w.id) && s.is_writer(w.id), "the role is kept");
        assert!(!s.take_over(w.id), "no take-over while paused");
        s.detach(w.id);
        // a viewer that attaches paused, wanting to write, reads until resume
        let (late, writes) = s.attach("late", true).unwrap();
        assert!(!writes && !s.may_write(late.id));
        let (watch, _) = s.attach("watch", false).unwrap();
        s.set_paused(false);
        assert!(s.may_write(late.id), "the one that asked writes at resume");
        assert!(!s.may_write(watch.id));
    }

    #[test]
    fn the_replay_keeps_the_last_bytes_only() {
        let s = Screen::new(8, 4, 4);
        s.push(b"hello ");
        s.push(b"world, again");
        let (a, _) = s.attach("a", false).unwrap();
        assert_eq!(
            a.replay, b"d, again",
            "the last 8 of \"hello world, again\""
        );
        s.push(b"0123456789ABCDEF");
        let (b, _) = s.attach("b", false).unwrap();
        assert_eq!(b.replay, b"89ABCDEF");
    }

    /// Whatever the interleaving, replay + live is exactly the output,
    /// once, in order.
    #[test]
    fn replay_then_live_loses_and_repeats_nothing() {
        let s = Arc::new(Screen::new(1 << 20, 1 << 16, 4));
        let writer = {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..2000u32 {
                    s.push(format!("{i},").as_bytes());
                }
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(1));
        let (mut a, _) = s.attach("late", false).unwrap();
        writer.join().unwrap();
        let (live, _) = drain(&mut a);
        let mut all = a.replay.clone();
        all.extend(live);
        let want: String = (0..2000u32).map(|i| format!("{i},")).collect();
        assert_eq!(String::from_utf8(all).unwrap(), want);
    }

    #[test]
    fn a_viewer_that_does_not_read_is_dropped_and_the_rest_go_on() {
        let s = Screen::new(64, 4, 4);
        let (slow, _) = s.attach("slow", true).unwrap();
        let (mut quick, _) = s.attach("quick", false).unwrap();
        for i in 0..100 {
            s.push(format!("{i};").as_bytes());
            // the quick one reads as it goes
            let _ = drain(&mut quick);
        }
        assert!(slow.lagged(), "the slow viewer is marked");
        assert!(!quick.lagged());
        let names: Vec<String> = s.viewers().into_iter().map(|v| v.1).collect();
        assert_eq!(names, ["quick"], "only the one that keeps up stays");
        assert!(!s.may_write(slow.id), "a dropped writer writes no more");
        // the slow one holds at most its queue
        let mut slow = slow;
        let mut n = 0;
        while slow.frames.try_recv().is_ok() {
            n += 1;
        }
        assert!(n <= 4, "{n} frames held for a viewer that did not read");
    }

    #[tokio::test]
    async fn a_slow_viewer_is_waited_for_and_one_that_stops_is_dropped() {
        use std::time::Duration;
        let s = Arc::new(Screen::new(64, 2, 4));
        let (mut slow, _) = s.attach("slow", true).unwrap();
        let (stuck, _) = s.attach("stuck", false).unwrap();
        // the slow one reads a frame every few milliseconds
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(Frame::Output(b)) = slow.frames.recv().await {
                got.extend_from_slice(&b);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (got, slow.lagged())
        });
        let mut want = Vec::new();
        for i in 0..50 {
            let piece = format!("{i};");
            want.extend_from_slice(piece.as_bytes());
            s.offer(piece.as_bytes(), Duration::from_millis(300)).await;
        }
        let names: Vec<String> = s.viewers().into_iter().map(|v| v.1).collect();
        assert_eq!(names, ["slow"], "the one that stopped reading is dropped");
        assert!(stuck.lagged());
        s.end(Some(0));
        let (got, lagged) = reader.await.unwrap();
        assert!(!lagged, "a viewer that keeps reading is not dropped");
        assert_eq!(got, want, "every byte, in order");
    }

    #[test]
    fn one_writer_at_a_time_and_take_over() {
        let s = Screen::new(64, 4, 4);
        let (a, a_writes) = s.attach("a", true).unwrap();
        let (b, b_writes) = s.attach("b", true).unwrap();
        assert!(a_writes && !b_writes, "the second reads only");
        assert!(s.may_write(a.id) && !s.may_write(b.id));
        assert!(s.take_over(b.id));
        assert!(!s.may_write(a.id) && s.may_write(b.id));
        s.detach(b.id);
        assert!(
            !s.may_write(b.id) && !s.may_write(a.id),
            "nobody writes until asked"
        );
        let (c, c_writes) = s.attach("c", true).unwrap();
        assert!(c_writes && s.may_write(c.id));
        assert!(!s.take_over(999), "only an attached viewer");
    }

    #[test]
    fn the_end_reaches_every_viewer_and_closes_the_screen() {
        let s = Screen::new(64, 4, 2);
        let (mut a, _) = s.attach("a", false).unwrap();
        let (_b, _) = s.attach("b", false).unwrap();
        assert_eq!(s.attach("c", false).err(), Some(AttachError::Full(2)));
        s.push(b"bye");
        s.end(Some(3));
        let (out, end) = drain(&mut a);
        assert_eq!((out.as_slice(), end), (&b"bye"[..], Some(Some(3))));
        assert!(!a.lagged());
        assert_eq!(s.attach("d", false).err(), Some(AttachError::Ended));
        s.push(b"after");
        assert!(s.viewers().is_empty());
    }
}
