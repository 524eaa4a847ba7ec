#!/usr/bin/env python3
"""Memory per sandbox at N concurrent sandboxes on one image, against N on
the host root, in the same invocation: every process of every sandbox
(the runner, init, the command) summed by its PSS (shared pages, the
image's files among them, divided among those who map them), and the
kernel's MemAvailable before and with all N running.

usage: bench/images_memory.py [N]   (default 200)
"""
import os, shutil, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AGENTVM, ROOT, build

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
build()
work = tempfile.mkdtemp(prefix="agentvm-bench-imgmem-")


def avail_kib():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def pss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(argv):
    before = avail_kib()
    procs = [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(n)]
    # every sandbox's command running: n sleeps under the runners
    deadline = time.time() + 120
    while time.time() < deadline:
        sleeps = sum(1 for p in procs for q in tree(p.pid)[1:] if open(f"/proc/{q}/comm").read().strip() == "sleep") \
            if all(p.poll() is None for p in procs) else -1
        if sleeps < 0:
            raise SystemExit("a sandbox ended early")
        if sleeps >= n:
            break
        time.sleep(0.5)
    else:
        raise SystemExit("the sandboxes did not all start in 120 s")
    pss = sum(pss_kib(q) for p in procs for q in tree(p.pid))
    used = before - avail_kib()
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
    time.sleep(2)
    return pss, used


try:
    subprocess.run(["sh", os.path.join(ROOT, "scripts", "tiny-image.sh")], cwd=work, check=True, stdout=subprocess.DEVNULL)
    data = os.path.join(work, "data")
    subprocess.run([AGENTVM, "images", "import", "image.tar", "--data-dir", data], cwd=work, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    img = [AGENTVM, "run", "--image", "tiny", "--data-dir", data, "--timeout", "300s", "--", "sleep", "300"]
    host = [AGENTVM, "run", "--timeout", "300s", "--", "sleep", "300"]
    pi, ui = measure(img)
    ph, uh = measure(host)
    print(f"{n} concurrent sandboxes running sleep: on one image PSS {pi / n:.0f} KiB per sandbox "
          f"(MemAvailable down {ui / n:.0f} KiB each); on the host root PSS {ph / n:.0f} KiB "
          f"(MemAvailable down {uh / n:.0f} KiB each); ratio {pi / max(ph, 1):.2f}x PSS", flush=True)
finally:
    shutil.rmtree(work, ignore_errors=True)
