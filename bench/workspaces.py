#!/usr/bin/env python3
"""Workspaces: each figure against a peer in the same invocation.

1. Checkpoint of a workspace with one changed file, over a 10,000-file
   and a 100,000-file repo: the API call's latency, median of N (target
   at most 5 ms, the same for both sizes).
2. Fork a checkpoint and run `true` in it (the fork's API call, then the
   job to its end), against a job running `true` over the plain repo on
   the same server (target at most 1.2x). Each round runs both, in turn
   first, and a job's end is the end of its followed log (no polling
   interval in the figure). Printed: the ratio of the medians, the median
   of each round's own ratio (which the machine's drift between rounds
   moves less), the lower quartiles, the sandbox's own setup_ms of each,
   and a control: two plain jobs timed the same way, whose ratio is what
   this machine's noise alone makes of two equal things.
3. 100 forks of one checkpoint, each changing one file: the growth of the
   layer store, against the repo's size (a copy per fork would be 100x).
4. A chain of 50 checkpoints (a job and a checkpoint each): the setup_ms of
   a job over it, against one over a fresh workspace (target within 1.5x),
   and the stack's depth (squashed past 48 layers).

usage: bench/workspaces.py [N]   (default 20)
"""
import os, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build, http, serve, stop

n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
build()
work = tempfile.mkdtemp(prefix="agentvm-bench-ws-")
root = os.path.join(work, "root")


def make_repo(name, files):
    d = os.path.join(root, name)
    for i in range(files):
        sub = os.path.join(d, f"d{i // 1000}")
        if i % 1000 == 0:
            os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i}.txt"), "w") as f:
            f.write(f"file {i}\n")
    return d


t = time.perf_counter()
small, big = make_repo("small", 10_000), make_repo("big", 100_000)
print(f"repos made in {time.perf_counter() - t:.1f} s", flush=True)

srv, HOST, PORT, KEY = serve(work, root, "--max-concurrent", "2")


def api(method, path, body=None):
    return http(HOST, PORT, KEY, method, path, body)


def job(body, follow=False):
    code, j = api("POST", "/v1/jobs", dict({"agent": "shell", "timeout": 600}, **body))
    assert code == 202, j
    if follow:
        # the stream ends when the job does
        api("GET", f"/v1/jobs/{j['id']}/logs?follow=true")
    while True:
        _, j = api("GET", f"/v1/jobs/{j['id']}")
        if j["status"] not in ("queued", "running"):
            assert j["status"] == "succeeded", j
            return j
        time.sleep(0.002)


def timed(f):
    t = time.perf_counter()
    r = f()
    return (time.perf_counter() - t) * 1000, r


med = statistics.median
try:
    # 1. checkpoint cost against repo size
    cp = {}
    for name, repo in (("10k", small), ("100k", big)):
        api("POST", "/v1/workspaces", {"name": name, "repo_path": repo})
        job({"workspace": name, "prompt": "echo changed > d0/f0.txt"})
        cp[name] = [timed(lambda i=i: api("POST", f"/v1/workspaces/{name}/checkpoints", {"name": f"c{i}"}))[0]
                    for i in range(n)]
    print(f"checkpoint (1 changed file): 10k-file repo median {med(cp['10k']):.2f} ms, "
          f"100k-file repo median {med(cp['100k']):.2f} ms; ratio {med(cp['100k']) / med(cp['10k']):.2f}x "
          f"(target at most 5 ms, the same for both)", flush=True)

    # 2. fork and run true, against a job over the plain repo
    _, c0 = api("GET", "/v1/workspaces/10k/checkpoints")
    c0 = c0["checkpoints"][0]["id"]
    fork_r, plain_r, ctl_a, ctl_b = [], [], [], []

    def fork(i):
        def run():
            code, w = api("POST", "/v1/workspaces", {"name": f"fork{i}", "from_checkpoint": c0})
            assert code == 201, w
            return job({"workspace": f"fork{i}", "prompt": "true"}, follow=True)
        ms, j = timed(run)
        return ms, j["result"]["setup_ms"]

    def plain():
        ms, j = timed(lambda: job({"repo_path": small, "prompt": "true"}, follow=True))
        return ms, j["result"]["setup_ms"]

    rounds = max(n, 40)
    for i in range(rounds):
        if i % 2:
            fork_r.append(fork(i)); plain_r.append(plain())
        else:
            plain_r.append(plain()); fork_r.append(fork(i))
        a, b = plain(), plain()
        (ctl_a if i % 2 else ctl_b).append(a[0]); (ctl_b if i % 2 else ctl_a).append(b[0])
    fork_ms, plain_ms = [f for f, _ in fork_r], [p for p, _ in plain_r]
    q1 = lambda xs: statistics.quantiles(xs, n=4)[0]
    per_round = med([f / p for f, p in zip(fork_ms, plain_ms)])
    print(f"fork + true: median {med(fork_ms):.1f} ms, lower quartile {q1(fork_ms):.1f} ms "
          f"(sandbox setup median {med([s for _, s in fork_r]):.0f} ms); plain repo + true: median "
          f"{med(plain_ms):.1f} ms, lower quartile {q1(plain_ms):.1f} ms (setup {med([s for _, s in plain_r]):.0f} ms); "
          f"ratio of medians {med(fork_ms) / med(plain_ms):.2f}x, of lower quartiles {q1(fork_ms) / q1(plain_ms):.2f}x, "
          f"median of the {rounds} rounds' own ratios {per_round:.2f}x (target at most 1.2x)", flush=True)
    print(f"control, plain + true against itself, the same rounds: ratio of medians "
          f"{med(ctl_a) / med(ctl_b):.2f}x, median of the rounds' own ratios "
          f"{med([a / b for a, b in zip(ctl_a, ctl_b)]):.2f}x (1.00x on a quiet machine)", flush=True)

    # 3. 100 forks of one checkpoint, each changing one file: disk growth
    def du(p):
        return int(subprocess.run(["du", "-sk", p], capture_output=True, text=True).stdout.split()[0])
    layers = os.path.join(work, "data", "layers")
    before = du(layers)
    for i in range(100):
        api("POST", "/v1/workspaces", {"name": f"many{i}", "from_checkpoint": c0})
        job({"workspace": f"many{i}", "prompt": f"echo fork {i} > d1/f1000.txt"})
    grown = du(layers) - before
    repo_kib = du(small)
    print(f"100 forks, one changed file each: layer store grew {grown} KiB ({grown / 100:.1f} KiB per fork); "
          f"the repo is {repo_kib} KiB, so a copy per fork would be {100 * repo_kib} KiB; "
          f"ratio {grown / (100 * repo_kib):.4f}x of copies", flush=True)

    # 4. a chain of 50 checkpoints: start-up against a fresh workspace
    api("POST", "/v1/workspaces", {"name": "chain", "repo_path": small})
    for i in range(50):
        job({"workspace": "chain", "prompt": f"echo {i} > d2/f{2000 + i}.txt"})
        api("POST", "/v1/workspaces/chain/checkpoints", {"name": f"k{i}"})
    _, w = api("GET", "/v1/workspaces/chain")
    api("POST", "/v1/workspaces", {"name": "fresh", "repo_path": small})
    chain_setup, fresh_setup = [], []
    for _ in range(n):
        chain_setup.append(job({"workspace": "chain", "prompt": "true"})["result"]["setup_ms"])
        fresh_setup.append(job({"workspace": "fresh", "prompt": "true"})["result"]["setup_ms"])
    print(f"chain of 50 checkpoints ({w['layers']} layers after squashing): job setup median "
          f"{med(chain_setup):.0f} ms; fresh workspace {med(fresh_setup):.0f} ms; "
          f"ratio {med(chain_setup) / max(med(fresh_setup), 1):.2f}x (target within 1.5x)", flush=True)
finally:
    stop(srv)
    subprocess.run(["rm", "-rf", work])
