"""Load test of a running app through its public API (`gradio_client`), not part of the tests.

    rsvlm-app --fake-model --port 7860 &          # or the real model
    python scripts/load_app.py --url http://127.0.0.1:7860/ --sessions 5 --minutes 1

N client sessions ask questions in a loop (a bbox over the loaded region + a question, the
``/ask`` endpoint) for M minutes. Prints requests, errors, p50/p95/max latency, throughput and
the server's RSS (resident memory) sampled during the run, so a leak shows as a rising RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostile_files import rss_mb  # noqa: E402

QUESTIONS = ("Find all buildings in this image.", "How many buildings are in this image?",
             "Describe this image in detail.", "Classify the scene: what kind of area is this?")


def server_pid(port: int) -> int | None:
    """The pid listening on ``port`` (Linux /proc), to sample its RSS; None if not found."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = str(fd.readlink())
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None




def worker(url: str, deadline: float, bbox: tuple[float, float, float, float], seed: int,
           latencies: list[float], errors: list[str], lock: threading.Lock) -> None:
    from gradio_client import Client

    rng = random.Random(seed)
    client = Client(url, verbose=False)
    w, s, e, n = bbox
    while time.time() < deadline:
        # A random sub-box of the region, at least a tenth of it on each side.
        fw, fh = rng.uniform(0.1, 1.0), rng.uniform(0.1, 1.0)
        x0, y0 = w + rng.uniform(0, 1 - fw) * (e - w), s + rng.uniform(0, 1 - fh) * (n - s)
        box = f"{x0:.7f},{y0:.7f},{x0 + fw * (e - w):.7f},{y0 + fh * (n - s):.7f}"
        t0 = time.perf_counter()
        try:
            text, geojson = client.predict(None, box, rng.choice(QUESTIONS), api_name="/ask")
            json.loads(geojson)
            with lock:
                latencies.append(time.perf_counter() - t0)
        except Exception as exc:  # counted and reported, the run goes on
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:7860/")
    p.add_argument("--sessions", type=int, default=5)
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--bbox", default=None,
                   help="W,S,E,N to sample boxes from (default: the Kampala demo region)")
    args = p.parse_args()
    bbox = (tuple(float(v) for v in args.bbox.split(",")) if args.bbox
            else (32.593689, 0.350187, 32.595749, 0.351560))
    port = int(args.url.rstrip("/").rsplit(":", 1)[1].split("/")[0])
    pid = server_pid(port)
    rss: list[float] = []
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.time() + args.minutes * 60
    threads = [threading.Thread(target=worker, args=(args.url, deadline, bbox, i, latencies,
                                                     errors, lock), daemon=True)
               for i in range(args.sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if pid is not None and (mb := rss_mb(pid)) is not None:
            rss.append(mb)
        time.sleep(2)
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def q(frac: float) -> float:
        return lat[min(len(lat) - 1, int(frac * len(lat)))] if lat else float("nan")

    print(f"sessions={args.sessions} minutes={args.minutes} url={args.url}")
    print(f"requests ok={len(lat)} errors={len(errors)} throughput={len(lat) / wall:.2f}/s")
    if lat:
        print(f"latency s: p50={q(0.5):.3f} p95={q(0.95):.3f} max={lat[-1]:.3f} "
              f"mean={statistics.fmean(lat):.3f}")
    if rss:
        third = max(1, len(rss) // 3)
        print(f"server RSS MB (pid {pid}): start={rss[0]:.0f} "
              f"first-third-mean={statistics.fmean(rss[:third]):.0f} "
              f"last-third-mean={statistics.fmean(rss[-third:]):.0f} max={max(rss):.0f}")
    else:
        print("server RSS: not sampled (server pid not found on this machine)")
    for err in sorted(set(errors))[:10]:
        print("error:", err)


if __name__ == "__main__":
    main()
