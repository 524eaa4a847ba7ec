#!/usr/bin/env python3
"""The web UI's first load, in Debian's Chromium driven by playwright-core
(bench/web_load.mjs): bytes received and time to a usable job list (its
first page of 50 shown), with JOBS jobs stored, against the same with 50
jobs stored in the same invocation (the list pages; it must not slow down
with the store). Targets: at most 200 KB first load, at most 300 ms.

Jobs are written straight into a stopped server's SQLite database (as
finished jobs), so that 10,000 of them cost seconds, not hours of runs.

usage: bench/web.py [JOBS] [RUNS]   (defaults 10000, 5)
needs: /usr/bin/chromium, node, playwright-core in /opt/agentvm-web-tests
(scripts/install-test-tools.sh installs them)
"""
import json, os, shutil, sqlite3, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, build, serve, stop

jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
build()


def store_with(n):
    work = tempfile.mkdtemp(prefix="agentvm-bench-web-")
    root = os.path.join(work, "root")
    os.makedirs(root)
    srv, _, _, _ = serve(work, root)
    stop(srv)
    db = sqlite3.connect(os.path.join(work, "data", "agentvm.db"))
    now = int(time.time() * 1000)
    db.executemany(
        "INSERT INTO jobs (id, agent, prompt, repo_path, timeout_s, status, created_at, started_at, finished_at, exit_code) "
        "VALUES (?, 'shell', ?, ?, 60, 'succeeded', ?, ?, ?, 0)",
        [(f"job_bench{i:011x}", f"echo {i}", root, now - (n - i) * 1000, now - (n - i) * 1000, now - (n - i) * 1000 + 500)
         for i in range(n)])
    db.commit()
    db.close()
    return work, root


def measure(work, root):
    srv, host, port, key = serve(work, root)
    try:
        run = os.path.join(work, "run")
        os.makedirs(run, exist_ok=True)
        shutil.copy(os.path.join(ROOT, "bench", "web_load.mjs"), run)
        link = os.path.join(run, "node_modules")
        if not os.path.exists(link):
            os.symlink("/opt/agentvm-web-tests/node_modules", link)
        out = []
        for _ in range(runs):
            r = subprocess.run(["node", os.path.join(run, "web_load.mjs"), f"http://{host}:{port}", key, "/usr/bin/chromium"],
                               capture_output=True, text=True, check=True)
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
        return out
    finally:
        stop(srv)


big = measure(*store_with(jobs))
small = measure(*store_with(50))
med = lambda xs, k: statistics.median(x[k] for x in xs)
bb, bs = med(big, "bytes"), med(small, "bytes")
tb, ts = med(big, "ms"), med(small, "ms")
print(f"first load, signed in, to a usable list: {jobs} jobs stored: {bb / 1024:.1f} KiB, {tb:.0f} ms (median of {runs}); "
      f"50 stored: {bs / 1024:.1f} KiB, {ts:.0f} ms; ratio {tb / ts:.2f}x time (targets: at most 200 KB, at most 300 ms)")
