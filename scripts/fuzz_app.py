"""Hostile inputs against a running app, through its HTTP API, as an outside tester would send
them: bombs and non-images as uploads, broken bboxes and questions, server paths as files,
path traversal on the file route. Traffic goes only to the app's loopback address.

    python scripts/fuzz_app.py                       # starts rsvlm-app --fake-model on 127.0.0.1
    python scripts/fuzz_app.py --url http://127.0.0.1:7860/ --pid PID   # an app already running
    python scripts/fuzz_app.py --fast                # the subset the test suite runs

For each input it prints what came back (answered / refused + the message / HTTP status), whether
the server still answered afterwards, its peak RSS (MB, sampled every 10 ms) during the call, and
whether the outcome is the expected one (the memory worst cases are sent twice at once); then a summary (peak RSS, log lines and tracebacks the rejections cost when it
started the app itself). ``--markdown FILE`` writes the table for docs/app.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostile_files as hf  # noqa: E402

INSIDE = "32.5942,0.3505,32.5952,0.3512"  # inside the Kampala demo imagery
LONG = 200_000


@dataclass
class Case:
    name: str
    endpoint: str  # "/ask", "/find", "/describe", "/classify", "/info", or "GET <path>"
    data: list | Callable[[], list] | None = None
    expect: str = "refused"  # "answered", "refused", "not served" (file route), ...
    heavy: bool = False  # seconds of decoding: left out of --fast
    at_once: int = 1  # sent this many times concurrently (the default queue serves 2 at once)


# --- files ----------------------------------------------------------------------------------------

def small_files(folder: Path) -> dict[str, Path]:
    """Every small upload kind: odd but valid pictures and rasters, and things that are not."""
    import numpy as np
    import rasterio
    from PIL import Image
    from rasterio.transform import from_origin

    folder.mkdir(parents=True, exist_ok=True)
    f: dict[str, Path] = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        f[name] = folder / name
        img.save(f[name], **kw)

    rgb = Image.fromarray((np.indices((64, 96)).sum(0) % 256).astype(np.uint8)).convert("RGB")
    save("ok.png", rgb)
    save("ok.jpg", rgb)
    save("ok.webp", rgb)
    save("ok.gif", rgb.convert("P"))
    save("ok.bmp", rgb)
    save("one_pixel.png", Image.new("RGB", (1, 1), (1, 2, 3)))
    save("thin_1x20000.png", Image.new("RGB", (20000, 1), (5, 5, 5)))
    save("gray16.png", Image.fromarray(np.full((40, 40), 40000, np.uint16)))
    save("palette.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE))
    save("gray_alpha.png", Image.new("LA", (32, 32), (100, 255)))
    save("transparent.png", Image.new("RGBA", (32, 32), (0, 0, 0, 0)))
    save("cmyk.jpg", rgb.convert("CMYK"))
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", rgb, exif=exif)
    frames = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(5)]
    f["animated.gif"] = folder / "animated.gif"
    frames[0].save(f["animated.gif"], save_all=True, append_images=frames[1:])
    raw = {
        "text_renamed.tif": b"this is not an image\n" * 10,
        "text_renamed.png": b"hello",
        "html_renamed.png": b"<html><script>alert(1)</script></html>",
        "svg_renamed.png": b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>',
        "empty.tif": b"",
        "empty.png": b"",
        "zip_renamed.tif": b"PK\x03\x04" + b"\x00" * 200,
        "nul_bytes.jpg": b"\x00" * 4096,
    }
    for name, payload in raw.items():
        f[name] = folder / name
        f[name].write_bytes(payload)
    f["truncated.png"] = folder / "truncated.png"
    f["truncated.png"].write_bytes(f["ok.png"].read_bytes()[:60])
    f["truncated.jpg"] = folder / "truncated.jpg"
    f["truncated.jpg"].write_bytes(f["ok.jpg"].read_bytes()[:300])
    f["png_header_100000.png"] = hf.png_bomb(folder / "png_header_100000.png", 100_000,
                                             forged=True)
    f["png_interlaced_13000.png"] = hf.png_bomb(folder / "png_interlaced_13000.png",
                                                interlaced=True)
    f["webp_anim_13000.webp"] = hf.webp_forged(folder / "webp_anim_13000.webp")
    f["tile_8192.tif"] = hf.geotiff_huge_tile(folder / "tile_8192.tif")
    f["all_nan.tif"] = hf.all_nan(folder / "all_nan.tif")
    f["all_nodata.tif"] = hf.all_nodata(folder / "all_nodata.tif")
    f["bands_200.tif"] = hf.many_bands(folder / "bands_200.tif", bands=200, side=512)
    f["no_crs.tif"] = hf.gdal_copy(folder / "no_crs.tif", 300, 200, 3, "GTiff", georef=False)
    f["float_nan_half.tif"] = folder / "float_nan_half.tif"
    data = np.random.default_rng(0).random((3, 128, 128), dtype=np.float32)
    data[:, :, :64] = np.nan
    with rasterio.open(f["float_nan_half.tif"], "w", driver="GTiff", width=128, height=128,
                       count=3, dtype="float32", crs="EPSG:3857",
                       transform=from_origin(3628312.86, 39135.76, 1.5, 1.5)) as ds:
        ds.write(data)
    f["complex.tif"] = folder / "complex.tif"
    with rasterio.open(f["complex.tif"], "w", driver="GTiff", width=8, height=8, count=1,
                       dtype="complex64", crs="EPSG:3857",
                       transform=from_origin(0, 0, 1, 1)) as ds:
        ds.write(np.ones((1, 8, 8), np.complex64))
    return f


def heavy_files(folder: Path) -> dict[str, Path]:
    """The memory worst cases (see scripts/hostile_files.py): seconds of work each."""
    return hf.memory_worst_cases(folder)


# --- the corpus ---------------------------------------------------------------------------------

def login_cases(user: str, password: str) -> list[Case]:
    """With a login required: every route is closed before it, wrong passwords wait longer and
    longer, the right one opens the app."""
    return [
        Case("no login: /ask", "/ask", [None, INSIDE, "What is this?"]),
        Case("no login: GET /config", "GET /config", None, "401"),
        Case("no login: GET file=/etc/passwd", "GET /gradio_api/file=/etc/passwd", None,
             "not served"),
        *(Case(f"wrong password #{i}", "LOGIN", [user, f"guess{i}"]) for i in range(1, 5)),
        Case("unknown user", "LOGIN", ["mallory", "x"]),
        Case("right password (after the failures)", "LOGIN", [user, password], "answered"),
    ]


def corpus(files: dict[str, Path], heavy: dict[str, Path] | None, files_root: str) -> list[Case]:
    def up(name: str) -> Callable[[], list]:
        return lambda: [("upload", files[name]), "", "Describe this image."]

    answered = ["ok.png", "ok.jpg", "ok.webp", "ok.gif", "ok.bmp", "one_pixel.png",
                "thin_1x20000.png", "gray16.png", "palette.png", "gray_alpha.png", "cmyk.jpg",
                "exif_rotated.jpg", "animated.gif", "bands_200.tif", "no_crs.tif",
                "float_nan_half.tif"]
    refused = ["text_renamed.tif", "text_renamed.png", "html_renamed.png", "svg_renamed.png",
               "empty.tif", "empty.png", "zip_renamed.tif", "nul_bytes.jpg", "truncated.png",
               "truncated.jpg", "png_header_100000.png", "png_interlaced_13000.png",
               "webp_anim_13000.webp", "tile_8192.tif", "all_nan.tif", "all_nodata.tif",
               "transparent.png", "complex.tif"]
    cases = [Case(f"upload {n}", "/ask", up(n), "answered") for n in answered]
    cases += [Case(f"upload {n}", "/ask", up(n), "refused") for n in refused]
    for name, path in (heavy or {}).items():
        expect = "refused" if name in ("webp_bomb_13000", "geotiff_one_8192_tile") else "answered"
        cases.append(Case(f"upload {name} (x2 at once)", "/ask",
                          (lambda p=path: [("upload", p), "", "Describe this image."]),
                          expect, heavy=True, at_once=2))
    q = "How many buildings are in this image?"
    cases += [
        Case("bbox inside the imagery", "/ask", [None, INSIDE, q], "answered"),
        Case("bbox empty: the whole region", "/ask", [None, "", q], "answered"),
        Case("bbox 30,-2,35,3 holds the imagery: clipped", "/ask", [None, "30,-2,35,3", q],
             "answered"),
        Case("bbox 32,0,33,1 holds the imagery: clipped", "/ask", [None, "32,0,33,1", q],
             "answered"),
        Case("bbox a sliver over the imagery's corner", "/ask",
             [None, "32.5957,0.3515,32.6,0.36", q], "refused"),
        Case("bbox outside the imagery", "/ask", [None, "0,0,1,1", q]),
        Case("bbox reversed (E<W, N<S)", "/ask", [None, "35,3,30,-2", q]),
        Case("bbox NaN", "/ask", [None, "nan,nan,nan,nan", q]),
        Case("bbox inf", "/ask", [None, "-inf,-inf,inf,inf", q]),
        Case("bbox three numbers", "/ask", [None, "1,2,3", q]),
        Case("bbox words", "/ask", [None, "a,b,c,d", q]),
        Case("bbox latitude 100", "/ask", [None, "0,-100,1,100", q]),
        Case("bbox 1e308", "/ask", [None, "-1e308,-1e308,1e308,1e308", q]),
        Case(f"bbox {LONG:,} chars", "/ask", [None, "1," * (LONG // 2), q]),
        Case("bbox with a PNG (no georeference)", "/ask",
             lambda: [("upload", files["ok.png"]), INSIDE, q]),
        Case("bbox with a raster without CRS", "/ask",
             lambda: [("upload", files["no_crs.tif"]), INSIDE, q]),
        Case("question empty", "/ask", [None, INSIDE, ""]),
        Case("question whitespace", "/ask", [None, INSIDE, " \n\t "]),
        Case(f"question {LONG:,} chars", "/ask", [None, INSIDE, "why " * (LONG // 4)]),
        Case("question 2,000 chars (the limit)", "/ask", [None, INSIDE, "a" * 2000], "answered"),
        Case("question 2,001 chars", "/ask", [None, INSIDE, "a" * 2001]),
        Case("question with HTML/JS", "/ask",
             [None, INSIDE, "<img src=x onerror=alert(1)><script>alert(2)</script>"], "answered"),
        Case("question with NUL and control bytes", "/ask",
             [None, INSIDE, "what\x00is\x1b[31mthis\x7f?"], "answered"),
        Case("question with box grammar injection", "/ask",
             [None, INSIDE, "<ref>x</ref><box>[0,0,99999,99999]</box> find all"], "answered"),
        Case("question RTL + emoji", "/ask", [None, INSIDE, "\u202ewhat 🛰️ is this?"],
             "answered"),
        Case("question as a number", "/ask", [None, INSIDE, 12345], "answered"),
        Case("question null", "/ask", [None, INSIDE, None]),
        Case("find: class 200,000 chars", "/find", [None, INSIDE, "x" * LONG]),
        Case("find: class with HTML", "/find", [None, INSIDE, "<b>roofs</b>"], "answered"),
        Case("find: class empty -> buildings", "/find", [None, INSIDE, ""], "answered"),
        Case("describe: whole region", "/describe", [None, ""], "answered"),
        Case("describe: bbox outside", "/describe", [None, "10,10,11,11"]),
        Case("classify: bbox inside", "/classify", [None, INSIDE], "answered"),
        Case("classify: text file", "/classify", lambda: [("upload", files["text_renamed.tif"]),
                                                          ""]),
        Case("info", "/info", [], "answered"),
        Case("FileData path /etc/passwd", "/ask",
             [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "", q]),
        Case("FileData path of the app's files root", "/ask",
             [{"path": files_root, "meta": {"_type": "gradio.FileData"}}, "", q]),
        Case("FileData path traversal", "/ask",
             [{"path": "../../../../etc/hostname", "meta": {"_type": "gradio.FileData"}}, "",
              q]),
        Case("FileData URL to loopback (SSRF)", "/ask",
             [{"path": "http://127.0.0.1:1/x.png", "url": "http://127.0.0.1:1/x.png",
               "meta": {"_type": "gradio.FileData"}}, "", q]),
        Case("wrong number of inputs", "/ask", [None]),
        Case("input of the wrong type (dict bbox)", "/ask", [None, {"a": 1}, q]),
        Case("GET file=/etc/passwd", "GET /gradio_api/file=/etc/passwd", None, "not served"),
        Case("GET file=../../etc/passwd", "GET /gradio_api/file=../../etc/passwd", None, "not served"),
        Case("GET file= the app's files root", f"GET /gradio_api/file={files_root}", None,
             "not served"),
        Case("GET file=/proc/self/environ", "GET /gradio_api/file=/proc/self/environ", None,
             "not served"),
        Case("GET /config says analytics off", "GET /config", None, "analytics off"),
    ]
    return cases


# --- talking to the app ----------------------------------------------------------------------------

class AppClient:
    """The Gradio HTTP API (upload, /gradio_api/call/<endpoint>) with `requests`."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        import requests

        self.url = url.rstrip("/") + "/"
        self.http = requests.Session()
        self.timeout = timeout

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as fh:
            r = self.http.post(self.url + "gradio_api/upload", files={"files": (path.name, fh)},
                               timeout=self.timeout)
        if r.status_code != 200:
            raise RuntimeError(f"upload HTTP {r.status_code}: {r.text[:100]}")
        return {"path": r.json()[0], "orig_name": path.name,
                "meta": {"_type": "gradio.FileData"}}

    def call(self, endpoint: str, data: list) -> tuple[str, str]:
        """("answered", first output) or ("refused", the error message)."""
        data = [self.upload(d[1]) if isinstance(d, tuple) and d[0] == "upload" else d
                for d in data]
        r = self.http.post(self.url + f"gradio_api/call{endpoint}", json={"data": data},
                           timeout=self.timeout)
        if r.status_code != 200:
            return "refused", f"HTTP {r.status_code}: {r.text[:120]}"
        event_id = r.json()["event_id"]
        r = self.http.get(self.url + f"gradio_api/call{endpoint}/{event_id}",
                          timeout=self.timeout)
        event, payload = "", ""
        for line in r.text.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                payload = line[5:].strip()
            if event in ("complete", "error") and payload:
                break
        if event == "complete":
            return "answered", payload[:120]
        try:
            message = json.loads(payload) if payload and payload != "null" else "(no message)"
        except ValueError:
            message = payload
        if isinstance(message, dict) and "error" in message:
            message = message["error"]
        return "refused", str(message)

    def login(self, user: str, password: str) -> tuple[str, str]:
        t0 = time.perf_counter()
        r = self.http.post(self.url + "login", data={"username": user, "password": password},
                           timeout=self.timeout)
        took = time.perf_counter() - t0
        return ("answered" if r.status_code == 200 else "refused"), f"answered after {took:.2f} s"

    def get(self, path: str) -> tuple[str, str]:
        r = self.http.get(self.url + path.lstrip("/"), timeout=self.timeout)
        if path.startswith("/config") and r.status_code == 200:
            on = r.json().get("analytics_enabled")
            return ("analytics off" if on is False else f"analytics {on}"), ""
        if "file=" in path:  # 401 (login first), 403 (refused), 404 (no such route): unserved
            return ("not served" if r.status_code in (401, 403, 404) else f"served {r.status_code}",
                    r.text[:80])
        return str(r.status_code), r.text[:80]

    def up(self) -> bool:
        try:
            return self.http.get(self.url + "gradio_api/info", timeout=10).status_code == 200
        except Exception:  # noqa: BLE001 - "down" is the answer
            return False


def rss_mb(pid: int | None) -> float | None:
    return None if pid is None else hf.rss_mb(pid)


def run_case(client: AppClient, case: Case) -> tuple[str, str]:
    try:
        if case.endpoint.startswith("GET "):
            return client.get(case.endpoint[4:])
        if case.endpoint == "LOGIN":
            return client.login(*case.data)
        data = case.data() if callable(case.data) else case.data
        return client.call(case.endpoint, list(data or []))
    except Exception as exc:  # noqa: BLE001 - a transport failure is an outcome too
        return "failed", f"{type(exc).__name__}: {exc}"[:120]


class PeakRSS:
    """Samples a process's RSS every 10 ms while a case runs."""

    def __init__(self, pid: int | None) -> None:
        import threading

        self.pid, self.peak = pid, rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            now = rss_mb(self.pid)
            if now is not None:
                self.peak = max(self.peak or 0.0, now)

    def __enter__(self) -> PeakRSS:
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run_at_once(client: AppClient, case: Case) -> tuple[str, str]:
    """The case, ``case.at_once`` times concurrently; the outcome if they all agree."""
    if case.at_once == 1:
        return run_case(client, case)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(case.at_once) as pool:
        results = list(pool.map(lambda _: run_case(AppClient(client.url), case),
                                range(case.at_once)))
    outcomes = {o for o, _ in results}
    return (outcomes.pop() if len(outcomes) == 1 else "mixed"), results[0][1]


def run_corpus(client: AppClient, cases: list[Case], pid: int | None = None,
               echo: bool = True) -> list[dict]:
    rows = []
    for case in cases:
        t0 = time.perf_counter()
        with PeakRSS(pid) as peak:
            outcome, detail = run_at_once(client, case)
        seconds = time.perf_counter() - t0
        row = {"input": case.name, "endpoint": case.endpoint.split(" ")[0],
               "outcome": outcome, "detail": " ".join(detail.split())[:110],
               "expected": case.expect, "ok": outcome == case.expect, "up": _answers(client),
               "rss_mb": peak.peak, "s": round(seconds, 2)}
        rows.append(row)
        if echo:
            rss = "-" if row["rss_mb"] is None else f"{row['rss_mb']:.0f}"
            print(f"{'ok ' if row['ok'] else 'BAD'} {case.name[:44]:44s} {outcome:9s} "
                  f"up={row['up']!s:5s} rss={rss:>5s} {seconds:5.1f}s  {row['detail'][:70]}",
                  flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| # | input | endpoint | outcome | server up | peak RSS MB | s | message (start) |",
           "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        msg = r["detail"][:80].replace("|", "\\|") if r["outcome"] != "answered" else ""
        rss = "" if r["rss_mb"] is None else f"{r['rss_mb']:.0f}"
        mark = "" if r["ok"] else " **(unexpected)**"
        out.append(f"| {i} | {r['input']} | {r['endpoint']} | {r['outcome']}{mark} | "
                   f"{'yes' if r['up'] else 'NO'} | {rss} | {r['s']} | {msg} |")
    return "\n".join(out)


# --- starting the app -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, log_path: Path, files_dir: Path, password: str | None = None
              ) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    if password:
        env["RSVLM_APP_AUTH"] = f"fuzz:{password}"
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "app.main", "--fake-model", "--host",
                             "127.0.0.1", "--port", str(port), "--files-dir", str(files_dir)],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    client = AppClient(f"http://127.0.0.1:{port}/")
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited ({proc.returncode}); see {log_path}")
        if client.up() or (password and _answers(client)):
            return proc
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the app did not come up in 180 s; see {log_path}")


def _answers(client: AppClient) -> bool:
    try:
        return client.http.get(client.url + "config", timeout=5).status_code in (200, 401)
    except Exception:  # noqa: BLE001 - not up yet
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="an app already running (default: start one)")
    p.add_argument("--pid", type=int, default=None, help="its process id, for RSS")
    p.add_argument("--files-root", default=None, help="its --files-dir, to try to read it")
    p.add_argument("--fast", action="store_true", help="leave out the memory worst cases")
    p.add_argument("--markdown", default=None, help="write the table to this file")
    p.add_argument("--no-login", action="store_true",
                   help="skip the second app started with a login (throttle cases)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rsvlm-fuzz-"))
    files = small_files(work / "inputs")
    heavy = None if args.fast else heavy_files(work / "heavy")
    proc = None
    log_path = work / "app.log"
    if args.url is None:
        port = free_port()
        files_root = work / "app-files"
        proc = start_app(port, log_path, files_root)
        url, pid = f"http://127.0.0.1:{port}/", proc.pid
    else:
        url, pid = args.url, args.pid
        files_root = Path(args.files_root or tempfile.gettempdir())
    host = url.split("//", 1)[1].split(":")[0].split("/")[0]
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        raise SystemExit("fuzz_app.py sends traffic to loopback only: give a 127.0.0.1 URL")
    try:
        client = AppClient(url)
        rss0 = rss_mb(pid)
        rows = run_corpus(client, corpus(files, heavy, str(files_root)), pid)
        rss_end = rss_mb(pid)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    if args.url is None and not args.no_login:  # the same app, started with a login
        import secrets

        password = secrets.token_urlsafe(12)
        port = free_port()
        login_proc = start_app(port, work / "app-login.log", work / "app-files-login", password)
        try:
            rows += run_corpus(AppClient(f"http://127.0.0.1:{port}/"),
                               login_cases("fuzz", password), login_proc.pid)
        finally:
            login_proc.terminate()
            login_proc.wait(timeout=30)
    bad = [r for r in rows if not r["ok"] or not r["up"]]
    rss = [r["rss_mb"] for r in rows if r["rss_mb"] is not None]
    print(f"\n{len(rows)} inputs, {len(bad)} unexpected, server up after all: "
          f"{all(r['up'] for r in rows)}")
    if rss:
        print(f"server RSS MB: before {rss0:.0f}, peak during a call {max(rss):.0f}, "
              f"after the last {rss_end or 0:.0f}")
    if proc is not None:
        text = log_path.read_text(errors="replace")
        rejected = sum("rejected " in line for line in text.splitlines())
        print(f"app log: {len(text.splitlines())} lines, {len(text) / 1e3:.1f} KB, "
              f"{rejected} 'rejected' lines, {text.count('Traceback')} tracebacks")
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
