#!/usr/bin/env python3
"""Change capture cost: does it follow the change, not the repo?

For repos of 1,000 / 10,000 / 50,000 files and 0 / 1 / 10 / 100 / 1,000
changed files, the median wall time of `agentvm run --repo R` with and
without --patch-out (the difference is what capture costs), interleaved.

usage: bench/capture.py [RUNS]   (default 15)
"""
import os, sys, shutil, subprocess, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AGENTVM, build, time_once, summary

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
build()
work = tempfile.mkdtemp(prefix="agentvm-bench-capture-")

def make_repo(n):
    r = os.path.join(work, f"repo{n}")
    for i in range(n):
        d = os.path.join(r, f"d{i // 100}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}"), "w") as f:
            f.write(f"line one of file {i}\nline two\nline three\n")
    return r

def changer(k):
    # append a line to k existing files spread over the tree
    return ["sh", "-c", f'i=0; while [ $i -lt {k} ]; do echo changed >> d$((i/100))/f$i; i=$((i+1)); done']

patch = os.path.join(work, "out.patch")
rows = []
try:
    for n in (1000, 10000, 50000):
        repo = make_repo(n)
        for k in (0, 1, 10, 100, 1000):
            if k > n or (n != 10000 and k not in (0, 1, 100)):
                continue
            base = [AGENTVM, "run", "--repo", repo]
            with_p = base + ["--patch-out", patch, "--"] + changer(k)
            without = base + ["--"] + changer(k)
            a, b = [], []
            time_once(with_p); time_once(without)
            for _ in range(runs):
                a.append(time_once(with_p)); b.append(time_once(without))
            size = os.path.getsize(patch)
            ma, mb = summary(a)["median"], summary(b)["median"]
            rows.append((n, k, mb, ma, ma - mb, size))
            print(f"repo {n:>6} files, {k:>5} changed: run {mb:7.2f} ms, with capture {ma:7.2f} ms, capture +{ma-mb:6.2f} ms, patch {size} bytes", flush=True)
        shutil.rmtree(repo)
finally:
    shutil.rmtree(work, ignore_errors=True)

one = {n: c for n, k, _, _, c, _ in rows if k == 1}
zero = {n: w for n, k, _, w, _, _ in rows if k == 0}
onew = {n: w for n, k, _, w, _, _ in rows if k == 1}
if 10000 in onew and 10000 in zero:
    print(f"10,000-file repo: one changed file costs {onew[10000]-zero[10000]:+.2f} ms over an unchanged run (target < 10 ms)")
