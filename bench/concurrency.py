#!/usr/bin/env python3
"""200 concurrent sandboxes running `sleep`: how long until all have
started, and how much memory each costs beyond the sleeping process, against
200 bare `sleep` processes started the same way in the same invocation.

Memory is what the wave's own memory cgroup is charged (user and kernel
memory: namespaces, mounts, page tables) when run as root on a host with a
cgroup v1 memory controller; otherwise the drop in MemAvailable (noisy).

usage: bench/concurrency.py [N]   (default 200; also measures agentvm-run when it is built)
"""
import os, sys, time, signal, subprocess
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AGENTVM, build

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
build()

def avail_kib():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise SystemExit("no MemAvailable")

MEMCG = "/sys/fs/cgroup/memory"

def own_memcg():
    for line in open("/proc/self/cgroup"):
        _, ctrls, path = line.rstrip("\n").split(":", 2)
        if "memory" in ctrls.split(","):
            return MEMCG + path
    return None

def wave(argv):
    """Start n copies, wait until each printed 'ready'; return (seconds, KiB used)."""
    subprocess.run(["sync"]); time.sleep(1.0)
    cg = None
    home = own_memcg()
    if os.geteuid() == 0 and home and os.path.isdir(home):
        cg = os.path.join(home, f"agentvm-bench-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(cg)
        # children inherit the cgroup: start them from a tiny shell placed in it
        spawn = lambda: subprocess.Popen(["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"] + argv,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        usage = lambda: int(open(os.path.join(cg, "memory.usage_in_bytes")).read()) // 1024
    else:
        spawn = lambda: subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        usage = lambda: before - avail_kib()
    before = avail_kib()
    t = time.perf_counter()
    procs = [spawn() for _ in range(n)]
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != b"ready":
            raise SystemExit(f"a process did not start: {line!r}")
    took = time.perf_counter() - t
    time.sleep(1.0)
    used = usage()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill(); p.wait()
    if cg:
        for _ in range(200):
            try:
                os.rmdir(cg); break
            except OSError:
                time.sleep(0.05)
    return took, used

cmd = ["sh", "-c", "echo ready; exec sleep 60"]
bare_t, bare_kib = wave(cmd)
box_t, box_kib = wave([AGENTVM, "run", "--"] + cmd)
hostnet_t, hostnet_kib = wave([AGENTVM, "run", "--network", "host", "--"] + cmd)
# the slim runner the server starts for jobs (same sandbox, smaller image)
SLIM = os.path.join(os.path.dirname(AGENTVM), "agentvm-run")
slim = os.path.exists(SLIM)
if slim:
    slim_t, slim_kib = wave([SLIM, "run", "--"] + cmd)
print(f"{n} bare sleeps:                     started in {bare_t*1000:8.1f} ms, {bare_kib/1024:7.1f} MiB")
print(f"{n} sandboxes:                       started in {box_t*1000:8.1f} ms, {box_kib/1024:7.1f} MiB")
print(f"{n} sandboxes, --network host:       started in {hostnet_t*1000:8.1f} ms, {hostnet_kib/1024:7.1f} MiB")
if slim:
    print(f"{n} sandboxes under agentvm-run:     started in {slim_t*1000:8.1f} ms, {slim_kib/1024:7.1f} MiB")
print(f"memory per sandbox beyond the sleeping process: {(box_kib-bare_kib)/n:.0f} KiB "
      f"(of which the network namespace {(box_kib-hostnet_kib)/n:.0f} KiB; target <= 1024 KiB)")
if slim:
    print(f"  under agentvm-run, as the server starts them: {(slim_kib-bare_kib)/n:.0f} KiB")
