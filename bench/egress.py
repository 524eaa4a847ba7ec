#!/usr/bin/env python3
"""Egress proxy: a 100 MB download through the proxy against the same
download directly over loopback, and the latency a CONNECT adds, in one
invocation. Also the full sandbox path (curl inside `agentvm run --network
allow:`, through the in-sandbox bridge and the Unix socket).

usage: bench/egress.py [ROUNDS]   (default 5 downloads each, 500 CONNECTs)
needs: curl; uses haproxy as a peer relay when it is installed
(apt-get install haproxy): a plain TCP relay with splice(2) and 1 MiB
pipes, doing less than the egress proxy (no HTTP, no policy), so it shows
what the extra loopback hop itself costs on this machine.
"""
import glob, os, re, resource, shutil, socket, statistics, subprocess, sys, tempfile, threading, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AGENTVM, build

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
build()
SIZE = 100 * 1024 * 1024
work = tempfile.mkdtemp(prefix="agentvm-bench-egress-")

# upstream: a raw socket server that answers every GET with a 100 MB file
# through sendfile(2), so sending costs almost no CPU and the machine's two
# cores go to the client and the proxy
blob = os.path.join(work, "blob")
with open(blob, "wb") as f:
    f.write(b"x" * SIZE)
def upstream(sock):
    while True:
        c, _ = sock.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
def serve(c):
    try:
        c.recv(65536)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % SIZE)
        with open(blob, "rb") as f:
            c.sendfile(f)
    except OSError:
        pass
    finally:
        c.close()
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(256); up = srv.getsockname()[1]
threading.Thread(target=upstream, args=(srv,), daemon=True).start()

px = subprocess.Popen([AGENTVM, "egress-proxy", "--allow", f"127.0.0.1:{up}"], stderr=subprocess.PIPE)
pport = int(re.search(rb":(\d+)\s*$", px.stderr.readline()).group(1))

ha, hport = None, None
if shutil.which("haproxy"):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); hport = s.getsockname()[1]; s.close()
    cfg = os.path.join(work, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
  maxconn 100
  nbthread 1
  maxpipes 64
  tune.pipesize 1048576
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option splice-request
  option splice-response
frontend f
  bind 127.0.0.1:{hport}
  default_backend b
backend b
  server u 127.0.0.1:{up}
""")
    ha = subprocess.Popen(["haproxy", "-f", cfg, "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", hport)).close()
            break
        except OSError:
            time.sleep(0.05)

def proxy_cpu():
    """CPU seconds the proxy has used, from the scheduler's ns counters."""
    t = 0
    for f in glob.glob(f"/proc/{px.pid}/task/*/schedstat"):
        try:
            t += int(open(f).read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return t / 1e9
def rusage(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime
# CPU seconds per party, summed over each mode's downloads: the upstream is
# this process (its sendfile thread), curl is our child
cpu = {m: {"upstream": 0.0, "proxy": 0.0, "curl": 0.0} for m in ("direct", "proxied")}
def curl(args, mode=None):
    u0, c0, p0 = rusage(resource.RUSAGE_SELF), rusage(resource.RUSAGE_CHILDREN), proxy_cpu()
    o = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download}"] + args, capture_output=True, text=True)
    if mode:
        cpu[mode]["upstream"] += rusage(resource.RUSAGE_SELF) - u0
        cpu[mode]["curl"] += rusage(resource.RUSAGE_CHILDREN) - c0
        cpu[mode]["proxy"] += proxy_cpu() - p0
    return float(o.stdout) / 1e6  # MB/s
url = f"http://127.0.0.1:{up}/big"
direct, proxied, tunnel, sandboxed, relayed = [], [], [], [], []
try:
    for _ in range(rounds):
        direct.append(curl([url], "direct"))
        proxied.append(curl(["-x", f"http://127.0.0.1:{pport}", url], "proxied"))
        tunnel.append(curl(["-x", f"http://127.0.0.1:{pport}", "--proxytunnel", url]))
        if ha:
            relayed.append(curl([f"http://127.0.0.1:{hport}/big"]))
        o = subprocess.run([AGENTVM, "run", "--network", f"allow:127.0.0.1:{up}", "--", "curl", "-s", "-o", "/dev/null",
                            "-w", "%{speed_download}", url], capture_output=True, text=True)
        sandboxed.append(float(o.stdout or 0) / 1e6)

    # CONNECT latency: open, CONNECT, read the 200, close  vs  open, close
    def connect_direct():
        t = time.perf_counter(); s = socket.create_connection(("127.0.0.1", up)); s.close(); return time.perf_counter() - t
    def connect_proxy():
        t = time.perf_counter()
        s = socket.create_connection(("127.0.0.1", pport))
        s.sendall(f"CONNECT 127.0.0.1:{up} HTTP/1.1\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(4096)
        dt = time.perf_counter() - t
        s.close()
        return dt
    for f in (connect_direct, connect_proxy):
        for _ in range(50): f()
    d, p = [], []
    for _ in range(500):
        d.append(connect_direct()); p.append(connect_proxy())
finally:
    px.kill()
    if ha:
        ha.kill()
    shutil.rmtree(work, ignore_errors=True)

md, mp, mt, ms = (statistics.median(x) for x in (direct, proxied, tunnel, sandboxed))
print(f"100 MB download over loopback, median of {rounds} (MB/s):")
print(f"  direct:                         {md:8.0f}")
print(f"  through the proxy (plain HTTP): {mp:8.0f}  {mp/md:5.2f}x direct")
print(f"  through the proxy (CONNECT):    {mt:8.0f}  {mt/md:5.2f}x direct")
print(f"  from inside a sandbox (bridge + unix socket + proxy, plain HTTP): {ms:8.0f}  {ms/md:5.2f}x direct")
if relayed:
    mh = statistics.median(relayed)
    print(f"  peer: haproxy TCP relay (splice, 1 MiB pipes): {mh:8.0f}  {mh/md:5.2f}x direct;"
          f" the egress proxy (plain HTTP) is {mp/mh:.2f}x haproxy")
print(f"CPU per 100 MB download (ms; upstream = the sendfile server, curl includes its start-up):")
tot = {}
for m, c in cpu.items():
    tot[m] = sum(c.values()) * 1000 / rounds
    parts = "  ".join(f"{k} {v * 1000 / rounds:5.1f}" for k, v in c.items())
    print(f"  {m:8s} {parts}  total {tot[m]:5.1f}")
print(f"  when every party competes for the same {os.cpu_count()} cores, the CPU-bound ceiling is"
      f" {tot['direct'] / tot['proxied']:.2f}x direct")
pd, pp = statistics.median(d) * 1000, statistics.median(p) * 1000
print(f"CONNECT, 500 each: TCP connect direct p50 {pd:.3f} ms; connect + CONNECT through the proxy p50 {pp:.3f} ms; added p50 {pp-pd:.3f} ms")
