#!/usr/bin/env python3
"""Start-to-exit of /bin/true: bare exec, bubblewrap (--unshare-all with the
same binds) and agentvm run (every layer on), interleaved in one invocation.

usage: bench/startup.py [RUNS]   (default 200)
"""
import os, sys, shutil
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AGENTVM, build, time_once, summary

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
build()
bwrap = shutil.which("bwrap")
if not bwrap:
    raise SystemExit("bwrap not found: apt-get install bubblewrap")

def exists(p):
    return os.path.lexists(p)

# bubblewrap with the binds agentvm makes: read-only system dirs (or the
# same symlinks), a filtered /etc, fresh /proc and /dev, private /tmp, HOME
# and /workspace, all namespaces, its own hostname.
bw = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--hostname", "agentvm"]
for d in ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "opt"]:
    p = "/" + d
    if os.path.islink(p):
        bw += ["--symlink", os.readlink(p), p]
    elif os.path.isdir(p):
        bw += ["--ro-bind", p, p]
for e in ["ld.so.cache", "ld.so.conf", "nsswitch.conf", "localtime", "alternatives", "ssl/certs", "ca-certificates", "passwd", "group", "hosts", "resolv.conf", "os-release", "profile"]:
    p = "/etc/" + e
    if exists(p):
        bw += ["--ro-bind", p, p]
bw += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/home/agent", "--tmpfs", "/workspace", "--chdir", "/workspace", "--cap-drop", "ALL", "/bin/true"]

variants = {
    "bare exec": ["/bin/true"],
    "bwrap --unshare-all": bw,
    "agentvm run": [AGENTVM, "run", "--", "/bin/true"],
    "agentvm run +cgroup limits": [AGENTVM, "run", "--memory", "256M", "--pids", "256", "--", "/bin/true"],
}
# the slim runner the server starts for jobs, when it is built
SLIM = os.path.join(os.path.dirname(AGENTVM), "agentvm-run")
if os.path.exists(SLIM):
    variants["agentvm-run run (server's)"] = [SLIM, "run", "--", "/bin/true"]
samples = {k: [] for k in variants}
for _ in range(5):
    for argv in variants.values():
        time_once(argv)
for _ in range(runs):  # interleaved, so machine noise hits every variant alike
    for k, argv in variants.items():
        samples[k].append(time_once(argv))

res = {k: summary(v) for k, v in samples.items()}
base = res["bwrap --unshare-all"]["median"]
print(f"start-to-exit of /bin/true, {runs} runs each, interleaved (ms)")
print(f"{'variant':28} {'median':>8} {'p10':>8} {'p90':>8} {'vs bwrap':>9}")
for k, r in res.items():
    print(f"{k:28} {r['median']:8.2f} {r['p10']:8.2f} {r['p90']:8.2f} {r['median']/base:8.2f}x")
