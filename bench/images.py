#!/usr/bin/env python3
"""Images, each figure against a peer in the same invocation:

1. Import: `agentvm images import` of an image (the tiny test image of
   scripts/tiny-image.sh, padded with FILES small files in a second layer),
   against `tar -x` of the same layers into a fresh directory: time and disk.
2. Start-up: `agentvm run --image tiny -- /bin/true` against `agentvm run --
   /bin/true` on the host root, interleaved (target at most 1.1x).

usage: bench/images.py [RUNS] [FILES]   (defaults 100, 20000)
"""
import os, shutil, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AGENTVM, ROOT, build, time_once

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 100
files = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
build()
work = tempfile.mkdtemp(prefix="agentvm-bench-img-")
try:
    env = dict(os.environ, PAD_FILES=str(files))
    subprocess.run(["sh", os.path.join(ROOT, "scripts", "tiny-image.sh")], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    data = os.path.join(work, "data")

    def du(p):
        return int(subprocess.run(["du", "-sk", p], capture_output=True, text=True).stdout.split()[0])

    t = time.perf_counter()
    subprocess.run([AGENTVM, "images", "import", "image.tar", "--data-dir", data], cwd=work, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    imp = time.perf_counter() - t
    x = os.path.join(work, "x")
    t = time.perf_counter()
    for layer in ("l1.tar.gz", "l2.tar"):
        os.makedirs(x, exist_ok=True)
        subprocess.run(["tar", "-C", x, "-xf", layer], cwd=work, check=True)
    tx = time.perf_counter() - t
    print(f"import ({files} padding files): {imp * 1000:.0f} ms, {du(os.path.join(data, 'images', 'layers'))} KiB; "
          f"tar -x of the same layers: {tx * 1000:.0f} ms, {du(x)} KiB; ratio {imp / tx:.2f}x time", flush=True)

    img = [AGENTVM, "run", "--image", "tiny", "--data-dir", data, "--", "/bin/true"]
    host = [AGENTVM, "run", "--", "/bin/true"]
    for _ in range(5):
        time_once(img); time_once(host)
    a, b = [], []
    for i in range(runs):
        if i % 2:
            a.append(time_once(img)); b.append(time_once(host))
        else:
            b.append(time_once(host)); a.append(time_once(img))
    med = statistics.median
    print(f"start-up to exit of /bin/true: on the image median {med(a):.2f} ms, on the host root median "
          f"{med(b):.2f} ms; ratio {med(a) / med(b):.2f}x, median of the rounds' own ratios "
          f"{med([x / y for x, y in zip(a, b)]):.2f}x (target at most 1.1x)", flush=True)
finally:
    shutil.rmtree(work, ignore_errors=True)
