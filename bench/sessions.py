#!/usr/bin/env python3
"""Interactive sessions, each figure against a peer in the same invocation.

1. Keystroke round trip (one byte in, its echo out) through the attach
   WebSocket on loopback, p50 and p99, against the same program on a bare
   PTY (os.openpty, no server, no sandbox). The program is
   `stty raw -echo; exec cat`, so each byte is echoed by a process, as a
   shell's line editor does.
2. Output throughput of a session printing 100 MB (recording on, as
   always), to a viewer attached from the start, against the same command
   on a bare PTY.
3. Memory: PSS of a detached idle session (server growth plus its
   sandbox's processes), of an attached idle one (the viewer's cost on the
   server), against a sleeping sandbox (`agentvm run -- sleep`).

4. The same round trip and throughput over SSH: the real OpenSSH client
   (`ssh -tt`, its stdin and stdout pipes) into AgentVM's SSH door, and
   the same client into Debian's own sshd started on another loopback
   port for the run (as root, with a throwaway host key and config). The
   sshd figures are skipped, saying so, when openssh-server is missing.

usage: bench/sessions.py [KEYSTROKES] [SESSIONS]   (defaults 2000 and 8)
"""
import json, os, pty, re, select, socket, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AGENTVM, WsClient, build, http, stop

keys_n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
sessions_n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
build()
work = tempfile.mkdtemp(prefix="agentvm-bench-sessions-")
root = os.path.join(work, "root"); os.makedirs(os.path.join(root, "repo"))
ECHO = ["sh", "-c", "stty raw -echo; exec cat"]
BIG = 100_000_000
PRINT = ["sh", "-c", f"read _; head -c {BIG} /dev/zero | tr '\\0' x"]

# one key for both SSH servers
ID = os.path.join(work, "id")
subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", ID], check=True)
AUTH = os.path.join(work, "authorized_keys")
with open(AUTH, "w") as f:
    f.write(open(ID + ".pub").read())
os.chmod(AUTH, 0o600)

srv = subprocess.Popen([AGENTVM, "serve", "--listen", "127.0.0.1:0", "--data-dir", os.path.join(work, "data"),
                        "--allowed-root", root, "--rate-limit", "0", "--max-sessions", "64",
                        "--max-sessions-per-key", "64", "--max-recording", "1G",
                        "--ssh-listen", "127.0.0.1:0", "--ssh-authorized-keys", AUTH],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       env=dict(os.environ, AGENTVM_LOG="warn"))
for line in srv.stderr:
    m = re.search(rb"SSH on [\d.]+:(\d+)", line)
    if m:
        SSH_PORT = int(m.group(1))
    m = re.search(rb"listening on http://([\d.]+):(\d+)", line)
    if m:
        HOST, PORT = m.group(1).decode(), int(m.group(2))
        break
KEY = open(os.path.join(work, "data", "admin.key")).read().strip()


def api(method, path, body=None):
    body = http(HOST, PORT, KEY, method, path, body)[1]
    return None if isinstance(body, bytes) and not body.strip() else body


def Ws(sid):
    return WsClient(HOST, PORT, KEY, sid)


def session(cmd):
    v = api("POST", "/v1/sessions", {"command": cmd})
    if not v or v.get("status") != "running":
        raise SystemExit(f"session did not start: {v}")
    return v["id"]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def rtt_ws():
    sid = session(ECHO)
    w = Ws(sid)
    w.recv()  # hello
    time.sleep(0.5)
    # drain the replay
    w.s.setblocking(False)
    try:
        while True:
            b = w.s.recv(65536)
            if not b:
                break
    except BlockingIOError:
        pass
    w.s.setblocking(True)
    w.buf = bytearray()
    out = []
    for i in range(keys_n + 100):
        t = time.perf_counter_ns()
        w.send(2, b"x")
        while True:
            op, p = w.recv()
            if op == 2 and b"x" in p:
                break
        if i >= 100:
            out.append((time.perf_counter_ns() - t) / 1e6)
    api("DELETE", f"/v1/sessions/{sid}")
    return out


def rtt_pty():
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(ECHO[0], ECHO)
    time.sleep(0.3)
    out = []
    for i in range(keys_n + 100):
        t = time.perf_counter_ns()
        os.write(fd, b"x")
        got = b""
        while b"x" not in got:
            got += os.read(fd, 4096)
        if i >= 100:
            out.append((time.perf_counter_ns() - t) / 1e6)
    os.kill(pid, 9); os.waitpid(pid, 0)
    return out


def throughput_ws():
    sid = session(PRINT)
    w = Ws(sid)
    w.recv()
    t = time.perf_counter()
    w.send(2, b"\n")
    n, dropped = 0, False
    while True:
        op, p = w.recv()
        if op == 2:
            n += p.count(b"x")
        elif op == 1:
            m = json.loads(p)
            if m.get("type") == "exit":
                break
            if "behind" in m.get("detail", ""):
                dropped = True
                break
        elif op == 8:
            break
    dt = time.perf_counter() - t
    return n, dt, dropped


def throughput_pty():
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(PRINT[0], PRINT)
    t = time.perf_counter()
    os.write(fd, b"\n")
    n = 0
    while True:
        try:
            b = os.read(fd, 1 << 16)
        except OSError:
            break
        if not b:
            break
        n += b.count(b"x")
    dt = time.perf_counter() - t
    os.waitpid(pid, 0)
    return n, dt


def start_sshd():
    """Debian's sshd on a free loopback port, for this run only; None if absent."""
    if not os.path.exists("/usr/sbin/sshd") or os.geteuid() != 0:
        return None, None
    hk = os.path.join(work, "sshd_host_key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hk], check=True)
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    cfg = os.path.join(work, "sshd_config")
    with open(cfg, "w") as f:
        f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {AUTH}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "StrictModes no\nUsePAM no\nPidFile none\nUseDNS no\n")
    os.makedirs("/run/sshd", exist_ok=True)
    p = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return p, port
        except OSError:
            time.sleep(0.05)
    p.kill()
    return None, None


def ssh_cmd(port, dest, command):
    return ["ssh", "-F", "none", "-tt", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-i", ID, "-p", str(port),
            dest, command]


def rtt_ssh(port, dest):
    p = subprocess.Popen(ssh_cmd(port, dest, "echo go; stty raw -echo; exec cat"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, bufsize=0)
    got = b""
    while b"go" not in got:
        got += os.read(p.stdout.fileno(), 4096)
    time.sleep(0.5)
    while select.select([p.stdout], [], [], 0.2)[0]:
        os.read(p.stdout.fileno(), 65536)
    out = []
    for i in range(keys_n + 100):
        t = time.perf_counter_ns()
        os.write(p.stdin.fileno(), b"x")
        got = b""
        while b"x" not in got:
            got += os.read(p.stdout.fileno(), 4096)
        if i >= 100:
            out.append((time.perf_counter_ns() - t) / 1e6)
    p.kill(); p.wait()
    return out


def throughput_ssh(port, dest):
    p = subprocess.Popen(ssh_cmd(port, dest, f"stty -echo; echo go; read _; head -c {BIG} /dev/zero | tr '\\0' x"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    got = b""
    while b"go" not in got:
        got += os.read(p.stdout.fileno(), 4096)
    t = time.perf_counter()
    os.write(p.stdin.fileno(), b"\n")
    n = 0
    while n < BIG:
        b = os.read(p.stdout.fileno(), 1 << 16)
        if not b:
            break
        n += b.count(b"x")
    dt = time.perf_counter() - t
    p.kill(); p.wait()
    return n, dt


def pss(pid):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree(pid):
    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += kids.get(q, [])
    return out


def memory():
    time.sleep(1)
    base_srv = pss(srv.pid)
    base_tree = sum(pss(p) for p in tree(srv.pid))
    ids = [session(["sleep", "600"]) for _ in range(sessions_n)]
    time.sleep(2)
    srv_detached = pss(srv.pid)
    tree_detached = sum(pss(p) for p in tree(srv.pid))
    viewers = [Ws(i) for i in ids]
    for v in viewers:
        v.recv()
    time.sleep(2)
    srv_attached = pss(srv.pid)
    for i in ids:
        api("DELETE", f"/v1/sessions/{i}")
    # the peer: sleeping sandboxes, the same number
    peers = [subprocess.Popen([AGENTVM, "run", "--", "sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(sessions_n)]
    time.sleep(2)
    sandbox = sum(sum(pss(q) for q in tree(p.pid)) for p in peers) / sessions_n
    for p in peers:
        p.kill(); p.wait()
    detached = (tree_detached - base_tree) / sessions_n
    return {
        "detached_kib": detached, "server_per_detached_kib": (srv_detached - base_srv) / sessions_n,
        "server_per_viewer_kib": (srv_attached - srv_detached) / sessions_n,
        "sleeping_sandbox_kib": sandbox, "ratio": detached / sandbox if sandbox else 0,
    }


try:
    ws_r, pty_r = rtt_ws(), rtt_pty()
    print(f"keystroke RTT ({keys_n} bytes): websocket p50 {pct(ws_r, .5):.3f} ms p99 {pct(ws_r, .99):.3f} ms; "
          f"bare pty p50 {pct(pty_r, .5):.3f} ms p99 {pct(pty_r, .99):.3f} ms; "
          f"p99 gap {pct(ws_r, .99) - pct(pty_r, .99):+.3f} ms")
    n, dt, dropped = throughput_ws()
    pn, pdt = throughput_pty()
    note = " (the viewer was dropped for falling behind)" if dropped else ""
    print(f"output 100 MB: session {n / dt / 1e6:.1f} MB/s ({n} bytes in {dt:.2f} s){note}; "
          f"bare pty {pn / pdt / 1e6:.1f} MB/s; ratio {(n / dt) / (pn / pdt):.2f}x")
    sshd, sshd_port = start_sshd()
    try:
        door_r = rtt_ssh(SSH_PORT, "bench@127.0.0.1")
        line = (f"keystroke RTT over ssh: agentvm door p50 {pct(door_r, .5):.3f} ms p99 {pct(door_r, .99):.3f} ms")
        if sshd:
            sshd_r = rtt_ssh(sshd_port, "root@127.0.0.1")
            line += (f"; sshd p50 {pct(sshd_r, .5):.3f} ms p99 {pct(sshd_r, .99):.3f} ms; "
                     f"p99 gap {pct(door_r, .99) - pct(sshd_r, .99):+.3f} ms (target within 2 ms)")
        else:
            line += "; sshd not run (install openssh-server and run as root)"
        print(line)
        # five rounds, alternating, so that a noisy moment hits both sides
        door_t, sshd_t = [], []
        for _ in range(5):
            dn, ddt = throughput_ssh(SSH_PORT, "bench@127.0.0.1")
            door_t.append(dn / ddt / 1e6)
            if sshd:
                sn, sdt = throughput_ssh(sshd_port, "root@127.0.0.1")
                sshd_t.append(sn / sdt / 1e6)
        line = (f"output 100 MB over ssh, 5 rounds: agentvm door {' '.join(f'{x:.1f}' for x in door_t)} MB/s "
                f"(median {pct(door_t, .5):.1f})")
        if sshd:
            ratios = [a / b for a, b in zip(door_t, sshd_t)]
            line += (f"; sshd {' '.join(f'{x:.1f}' for x in sshd_t)} MB/s (median {pct(sshd_t, .5):.1f}); "
                     f"ratio per round {' '.join(f'{r:.2f}' for r in ratios)}x, median {pct(ratios, .5):.2f}x "
                     f"(target at least 0.8x)")
        print(line)
    finally:
        if sshd:
            sshd.kill(); sshd.wait()
    m = memory()
    print(f"memory ({sessions_n} sessions): detached idle session {m['detached_kib']:.0f} KiB PSS "
          f"(server {m['server_per_detached_kib']:.0f} KiB of it), attached viewer +{m['server_per_viewer_kib']:.0f} KiB "
          f"on the server; sleeping sandbox {m['sleeping_sandbox_kib']:.0f} KiB; detached/sandbox {m['ratio']:.2f}x")
finally:
    stop(srv)
