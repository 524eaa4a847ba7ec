#!/usr/bin/env python3
"""Control-plane benchmarks, each against a peer in the same invocation.

1. Jobs running `true` submitted and completed end to end through /v1 with
   SQLite: jobs/s, and p50/p99 submit-to-done latency (from the server's own
   created_at/finished_at). Peer: the same sandboxes run directly with
   `agentvm run` at the same concurrency (the server's overhead is the gap).
2. GET /health with 64 connections (wrk): requests/s and p99. Peer: a
   FastAPI/uvicorn /health, the kind of server AgentVM replaces (skipped if
   fastapi/uvicorn are not installed).
3. Server RSS idle, after 1,000 jobs and after 10,000 jobs.

usage: bench/server.py [JOBS] [MEMORY_JOBS]   (defaults 2000 and 10000)
needs: wrk (apt-get install wrk); optional: pip install fastapi uvicorn
"""
import concurrent.futures, http.client, json, os, re, shutil, signal, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AGENTVM, build

jobs_n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
mem_n = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
CONC = 8
build()
work = tempfile.mkdtemp(prefix="agentvm-bench-server-")
root = os.path.join(work, "root"); repo = os.path.join(root, "repo")
os.makedirs(repo); open(os.path.join(repo, "f"), "w").write("x\n")
os.chmod(work, 0o755)

def start():
    p = subprocess.Popen([AGENTVM, "serve", "--listen", "127.0.0.1:0", "--data-dir", os.path.join(work, "data"),
                          "--allowed-root", root, "--rate-limit", "0", "--max-queue", "1000000",
                          "--max-concurrent", str(CONC)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=dict(os.environ, AGENTVM_LOG="warn"))
    for line in p.stderr:
        m = re.search(rb"listening on http://([\d.]+):(\d+)", line)
        if m:
            return p, m.group(1).decode(), int(m.group(2))
    raise SystemExit("server did not start")

def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

srv, host, port = start()
key = open(os.path.join(work, "data", "admin.key")).read().strip()
H = {"X-API-Key": key, "Content-Type": "application/json"}
body = json.dumps({"agent": "shell", "prompt": "true", "repo_path": repo, "timeout": 60})

def submit_many(n):
    """Submit n jobs from CONC client threads with keep-alive connections."""
    def worker(k):
        c = http.client.HTTPConnection(host, port); ids = []
        for _ in range(k):
            c.request("POST", "/v1/jobs", body, H); r = c.getresponse(); d = r.read()
            if r.status != 202: raise SystemExit(f"submit: {r.status} {d[:200]}")
            ids.append(json.loads(d)["id"])
        return ids
    per = [n // CONC + (1 if i < n % CONC else 0) for i in range(CONC)]
    with concurrent.futures.ThreadPoolExecutor(CONC) as ex:
        return [i for ids in ex.map(worker, per) for i in ids]

def wait_all(ids):
    c = http.client.HTTPConnection(host, port); out = []
    for i in ids:
        while True:
            c.request("GET", f"/v1/jobs/{i}", headers=H); j = json.loads(c.getresponse().read())
            if j["status"] not in ("queued", "running"): out.append(j); break
            time.sleep(0.05)
    return out

def pct(xs, q):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(q * len(xs)))]

try:
    time.sleep(1.0)
    idle = rss_kib(srv.pid)

    # 1. throughput, and its peer
    submit_many(50); time.sleep(1)  # warm-up
    t0 = time.time()
    ids = submit_many(jobs_n)
    done = wait_all(ids)
    wall = time.time() - t0
    bad = [j for j in done if j["status"] != "succeeded"]
    if bad: raise SystemExit(f"{len(bad)} jobs did not succeed, e.g. {bad[0]}")
    first = min(j["created_at"] for j in done); last = max(j["finished_at"] for j in done)
    lat = [j["finished_at"] - j["created_at"] for j in done]
    server_rate = len(done) / ((last - first) / 1000)
    def direct(_):
        subprocess.run([AGENTVM, "run", "--repo", repo, "--patch-out", "/dev/null", "--", "true"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    t1 = time.time()
    with concurrent.futures.ThreadPoolExecutor(CONC) as ex:
        list(ex.map(direct, range(jobs_n)))
    direct_rate = jobs_n / (time.time() - t1)
    print(f"jobs end to end through /v1 (SQLite, {CONC} concurrent, {jobs_n} jobs running `true`):")
    print(f"  server:  {server_rate:7.1f} jobs/s  submit-to-done p50 {pct(lat, .5):.0f} ms  p99 {pct(lat, .99):.0f} ms  (wall {wall:.1f} s incl. polling)")
    print(f"  peer, agentvm run directly at the same concurrency: {direct_rate:7.1f} jobs/s  -> server/direct {server_rate/direct_rate:.2f}x")

    # 2. /health under wrk, and the FastAPI peer
    def wrk(url):
        o = subprocess.run(["wrk", "-t2", "-c64", "-d10s", "--latency", url], capture_output=True, text=True).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", o).group(1))
        m = re.search(r"99%\s+([\d.]+)(us|ms|s)", o)
        p99 = float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
        return rps, p99
    rps, p99 = wrk(f"http://{host}:{port}/health")
    print(f"GET /health, wrk 64 connections 10 s:")
    print(f"  agentvm:         {rps:10.0f} req/s  p99 {p99:.2f} ms")
    try:
        import fastapi, uvicorn  # noqa: F401
        app = os.path.join(work, "peer.py")
        open(app, "w").write("from fastapi import FastAPI\napp = FastAPI()\n@app.get('/health')\ndef health():\n    return {'status': 'healthy', 'service': 'agentvm'}\n")
        peer = subprocess.Popen([sys.executable, "-m", "uvicorn", "peer:app", "--port", "18555", "--log-level", "warning"],
                                cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2.5)
        prps, pp99 = wrk("http://127.0.0.1:18555/health")
        peer.terminate(); peer.wait()
        print(f"  FastAPI/uvicorn: {prps:10.0f} req/s  p99 {pp99:.2f} ms  -> agentvm/peer {rps/prps:.1f}x req/s")
    except ImportError:
        print("  (peer skipped: pip install fastapi uvicorn)")

    # 3. memory
    after_warm = rss_kib(srv.pid)
    left = mem_n - jobs_n - 50
    r1k = None
    done_n = jobs_n + 50
    while left > 0:
        k = min(1000, left)
        wait_all(submit_many(k)); left -= k; done_n += k
        if r1k is None and done_n >= 1000: r1k = rss_kib(srv.pid)
    r10k = rss_kib(srv.pid)
    print(f"server RSS: idle {idle/1024:.1f} MiB, after {jobs_n+50} jobs {after_warm/1024:.1f} MiB, after {done_n} jobs {r10k/1024:.1f} MiB "
          f"(growth from the first measurement after load: {100*(r10k-after_warm)/after_warm:+.1f}%)")
finally:
    srv.send_signal(signal.SIGTERM)
    try: srv.wait(30)
    except subprocess.TimeoutExpired: srv.kill()
    shutil.rmtree(work, ignore_errors=True)
