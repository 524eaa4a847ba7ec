"""Shared helpers for the benchmark scripts: timing child processes."""
import json, os, socket, statistics, subprocess, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENTVM = os.environ.get("AGENTVM", os.path.join(ROOT, "target", "release", "agentvm"))


def build():
    if "AGENTVM" not in os.environ:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "agentvm"], cwd=ROOT, check=True)


def time_once(argv, **kw):
    t = time.perf_counter_ns()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    dt = (time.perf_counter_ns() - t) / 1e6
    if r.returncode != 0:
        raise SystemExit(f"{argv[:4]}... exited {r.returncode}: {r.stderr.decode(errors='replace')[-400:]}")
    return dt


def sample(argv, n, warmup=5, **kw):
    for _ in range(warmup):
        time_once(argv, **kw)
    return [time_once(argv, **kw) for _ in range(n)]


def summary(xs):
    xs = sorted(xs)
    p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
    return {"median": statistics.median(xs), "p10": p(0.10), "p90": p(0.90), "n": len(xs)}


def http(host, port, key, method, path, body=None):
    """One request to the server (a connection of its own): the status and
    the body, parsed when it is JSON."""
    s = socket.create_connection((host, port))
    data = json.dumps(body).encode() if body is not None else b""
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    resp = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        resp += b
    head, _, body = resp.partition(b"\r\n\r\n")
    code = int(head.split(b" ")[1])
    return code, (json.loads(body) if body.strip()[:1] in (b"{", b"[") else body)
