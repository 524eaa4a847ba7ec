#!/usr/bin/env python3
"""Pause and resume of a session, against the same program stopped and
continued with SIGSTOP/SIGCONT (no server, no sandbox) in the same run.

The program spins reading the clock (CLOCK_REALTIME, which the sandbox
shares with the host) and, whenever two readings are more than 2 ms
apart, prints both: the second is its first instruction after it ran
again. Each round the bench notes the time just before it asks for the
resume (the POST, or the kill(SIGCONT)) and finds the gap that spans that
moment (others are the scheduler's): resume latency = the first
instruction after it - the ask. Pause latency
is the POST's own round trip (it answers once the kernel says every
process is frozen).

Target (issue 11): resume under 10 ms to the first instruction.

usage: bench/pause.py [ROUNDS]   (default 30)
"""
import os, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WsClient, build, http, serve, stop

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
build()
work = tempfile.mkdtemp(prefix="agentvm-bench-pause-")
root = os.path.join(work, "root")
os.makedirs(root)

PROG = ("import time,sys\n"
        "last=time.time_ns()\n"
        "while True:\n"
        "    t=time.time_ns()\n"
        "    if t-last>2000000:\n"
        "        sys.stdout.write(f'GAP {last} {t}\\n'); sys.stdout.flush()\n"
        "    last=t\n")

srv, HOST, PORT, KEY = serve(work, root)


def api(method, path, body=None):
    return http(HOST, PORT, KEY, method, path, body)


class Lines:
    """Terminal output of a WebSocket viewer, line by line."""

    def __init__(self, w):
        self.w, self.buf = w, b""

    def gap_across(self, asked):
        """The first instruction after the gap that spans `asked` (gaps
        before it are the scheduler's, not the pause's)."""
        while True:
            while b"\n" in self.buf:
                line, _, self.buf = self.buf.partition(b"\n")
                parts = line.strip().split()
                if len(parts) == 3 and parts[0] == b"GAP" and int(parts[1]) < asked <= int(parts[2]):
                    return int(parts[2])
            op, payload = self.w.recv()
            if op == 2:
                self.buf += payload


def session_rounds():
    code, v = api("POST", "/v1/sessions", {"command": ["python3", "-c", PROG], "idle_timeout": 3600})
    if code != 201:
        raise SystemExit(f"session did not start: {code} {v}")
    sid = v["id"]
    out = Lines(WsClient(HOST, PORT, KEY, sid))
    time.sleep(0.5)
    pause_ms, resume_ms = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        code, v = api("POST", f"/v1/sessions/{sid}/pause")
        pause_ms.append((time.perf_counter() - t) * 1e3)
        if code != 200 or not v.get("paused"):
            raise SystemExit(f"pause: {code} {v}")
        time.sleep(0.05)
        asked = time.time_ns()
        code, v = api("POST", f"/v1/sessions/{sid}/resume")
        if code != 200:
            raise SystemExit(f"resume: {code} {v}")
        first = out.gap_across(asked)
        resume_ms.append((first - asked) / 1e6)
        time.sleep(0.02)
    api("DELETE", f"/v1/sessions/{sid}")
    return pause_ms, resume_ms


def signal_rounds():
    p = subprocess.Popen(["python3", "-c", PROG], stdout=subprocess.PIPE)
    time.sleep(0.5)
    resume_ms = []
    for _ in range(rounds):
        os.kill(p.pid, 19)  # SIGSTOP
        time.sleep(0.05)
        asked = time.time_ns()
        os.kill(p.pid, 18)  # SIGCONT
        while True:
            line = p.stdout.readline().split()
            if int(line[1]) < asked <= int(line[2]):
                break
        resume_ms.append((int(line[2]) - asked) / 1e6)
        time.sleep(0.02)
    p.kill()
    p.wait()
    return resume_ms


def show(name, xs):
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
    print(f"{name:<44} median {statistics.median(xs):7.3f} ms   p90 {pick(0.9):7.3f}   max {xs[-1]:7.3f}   (n={len(xs)})")
    return statistics.median(xs)


try:
    pause_ms, resume_ms = session_rounds()
    sig_ms = signal_rounds()
    print(f"pause and resume, {rounds} rounds each")
    show("session pause (POST round trip, frozen)", pause_ms)
    r = show("session resume -> first instruction", resume_ms)
    s = show("SIGCONT -> first instruction (peer)", sig_ms)
    print(f"resume vs peer: {r / s:.2f}x   target: resume under 10 ms: {'met' if max(resume_ms) < 10 else 'NOT met'} (max {max(resume_ms):.3f} ms)")
finally:
    stop(srv)
