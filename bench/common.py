"""Shared helpers for the benchmark scripts: timing child processes."""
import base64, json, os, socket, statistics, struct, subprocess, time

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


def serve(work, root, *extra):
    """`agentvm serve` on loopback with its data in WORK/data: the process,
    its host and port, and its admin key."""
    srv = subprocess.Popen([AGENTVM, "serve", "--listen", "127.0.0.1:0", "--data-dir", os.path.join(work, "data"),
                            "--allowed-root", root, "--rate-limit", "0", *extra],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=dict(os.environ, AGENTVM_LOG="warn"))
    for line in srv.stderr:
        if b"listening on http://" in line:
            host, port = line.split(b"http://")[1].strip().decode().rsplit(":", 1)
            break
    else:
        raise SystemExit("the server did not start")
    key = open(os.path.join(work, "data", "admin.key")).read().strip()
    return srv, host, int(port), key


def stop(srv):
    """Stop a server `serve` started: SIGTERM, then SIGKILL after 30 s."""
    srv.terminate()
    try:
        srv.wait(timeout=30)
    except subprocess.TimeoutExpired:
        srv.kill()


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


class WsClient:
    """A minimal WebSocket client (RFC 6455): enough for the attach socket."""

    def __init__(self, host, port, key, sid):
        self.s = socket.create_connection((host, port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        k = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(f"GET /v1/sessions/{sid}/attach HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {k}\r\nSec-WebSocket-Version: 13\r\n"
                       f"X-API-Key: {key}\r\n\r\n".encode())
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(4096)
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise SystemExit(f"attach refused: {head!r}")
        self.buf = bytearray(rest)

    def _need(self, n):
        while len(self.buf) < n:
            b = self.s.recv(1 << 20)
            if not b:
                raise EOFError
            self.buf += b

    def recv(self):
        self._need(2)
        op, ln = self.buf[0] & 0x0F, self.buf[1] & 0x7F
        off = 2
        if ln == 126:
            self._need(4); ln = struct.unpack(">H", self.buf[2:4])[0]; off = 4
        elif ln == 127:
            self._need(10); ln = struct.unpack(">Q", self.buf[2:10])[0]; off = 10
        self._need(off + ln)
        payload = bytes(self.buf[off:off + ln])
        del self.buf[:off + ln]
        return op, payload

    def send(self, op, payload):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | op]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
        self.s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
