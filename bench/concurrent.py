#!/usr/bin/env python3
"""200 concurrent sandboxes running `sleep`: how long until all have
started, and how much memory each costs beyond the sleeping process, against
200 bare `sleep` processes started the same way in the same invocation.

usage: bench/concurrent.py [N]   (default 200)
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

def wave(argv):
    """Start n copies, wait until each printed 'ready'; return (seconds, KiB used)."""
    subprocess.run(["sync"]); time.sleep(1.0)
    before = avail_kib()
    t = time.perf_counter()
    procs = [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for _ in range(n)]
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != b"ready":
            raise SystemExit(f"a process did not start: {line!r}")
    took = time.perf_counter() - t
    time.sleep(1.0)
    used = before - avail_kib()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill(); p.wait()
    return took, used

cmd = ["sh", "-c", "echo ready; exec sleep 60"]
bare_t, bare_kib = wave(cmd)
box_t, box_kib = wave([AGENTVM, "run", "--"] + cmd)
box_t2, box_kib2 = wave([AGENTVM, "run", "--memory", "256M", "--pids", "64", "--"] + cmd)
print(f"{n} bare sleeps:                     started in {bare_t*1000:8.1f} ms, {bare_kib/1024:7.1f} MiB")
print(f"{n} sandboxes:                       started in {box_t*1000:8.1f} ms, {box_kib/1024:7.1f} MiB")
print(f"{n} sandboxes with cgroup limits:    started in {box_t2*1000:8.1f} ms, {box_kib2/1024:7.1f} MiB")
print(f"memory per sandbox beyond the sleeping process: {(box_kib-bare_kib)/n:.0f} KiB "
      f"(with cgroups {(box_kib2-bare_kib)/n:.0f} KiB; target <= 1024 KiB)")
