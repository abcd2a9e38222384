"""``rsvlm-app``: parse arguments, load the region, start the model loading, serve the page."""

from __future__ import annotations

import argparse
import logging
import socket
import tempfile
from pathlib import Path

from app.backend import Backend, EngineBackend, FakeBackend, LoadingBackend
from app.handlers import AppContext
from app.region import DEMO_REGION, Region

log = logging.getLogger("app")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rsvlm-app", description=__doc__)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default=None,
                   help="preset name or model folder (default: chosen for this machine)")
    p.add_argument("--quantize", choices=["4bit", "none"], default=None,
                   help="force 4-bit or full precision (default: the preset's choice)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--decode", choices=["auto", "torch", "onnx", "onnx-int8"], default="auto",
                   help="who runs decode steps on the CPU (default: ONNX Runtime where it can)")
    p.add_argument("--region", default=str(DEMO_REGION),
                   help="folder with one imagery file and its OSM GeoJSON/GPKG or .osm.pbf extract")
    p.add_argument("--osm", default=None, metavar="auto|FILE|none",
                   help="OSM features for imagery outside the region (uploads, fetched tiles): "
                        "'auto' asks Overpass (answers cached on disk), FILE is a local "
                        ".osm.pbf extract or vector file, 'none' shows none (default: auto when "
                        "online, none with --offline)")
    p.add_argument("--overpass-url", default=None, metavar="URL",
                   help="Overpass interpreter URL for --osm auto (default $RSVLM_OVERPASS_URL "
                        "or overpass-api.de)")
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="require this login (Gradio auth)")
    p.add_argument("--max-upload-mb", type=float, default=50.0)
    p.add_argument("--concurrency", type=int, default=2,
                   help="model requests served at once (the rest wait in the queue)")
    p.add_argument("--chip-size", type=int, default=512, help="longest side of a chip, px")
    p.add_argument("--offline", action="store_true",
                   help="never offer internet basemaps (default: offered when reachable)")
    p.add_argument("--fake-model", action="store_true",
                   help="canned answers instead of a model (UI testing, load tests)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def network_reachable(host: str = "server.arcgisonline.com", timeout: float = 1.5) -> bool:
    """Whether basemap tiles are likely to load (the browser usually shares our network)."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def make_backend(args: argparse.Namespace) -> Backend:
    if args.fake_model:
        return FakeBackend()
    quantize = {"4bit": True, "none": False}.get(args.quantize)
    return LoadingBackend(lambda progress: EngineBackend.load(
        args.model, device=args.device, quantize=quantize, progress=progress,
        decode=args.decode),
        name=args.model or "default")


def build_context(args: argparse.Namespace, backend: Backend) -> AppContext:
    region = Region.load(args.region) if args.region else None
    export_dir = Path(tempfile.gettempdir()) / "rsvlm-app-exports"
    online = False if args.offline else network_reachable()
    log.info("basemaps: %s", "online (xyzservices)" if online else "offline (local imagery only)")
    osm = make_osm_source(args, online)
    return AppContext(backend=backend, region=region, export_dir=export_dir,
                      chip_size=args.chip_size, max_upload_mb=args.max_upload_mb, online=online,
                      osm=osm)


def make_osm_source(args: argparse.Namespace, online: bool):
    """The OSM source for imagery outside the region (`training.osm_source`), or None."""
    from training.osm_source import open_osm

    choice = getattr(args, "osm", None)
    if choice is None:
        choice = "auto" if online else "none"
    try:
        # Bounded: an upload waits for its area's features at most this long.
        osm = open_osm(choice, endpoint=getattr(args, "overpass_url", None), timeout_s=20.0)
    except RuntimeError as exc:  # OSMError: a missing file or a bad URL
        raise ValueError(str(exc)) from exc
    log.info("OSM features outside the region: %s", osm.description if osm else "none")
    return osm


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("--auth takes USER:PASS")
    return user, password


def launch(ctx: AppContext, *, host: str, port: int, auth: tuple[str, str] | None,
           concurrency: int, max_upload_mb: float, prevent_thread_lock: bool = False):
    from app.layout import CSS, build_demo
    from app.map_html import BRIDGE_JS

    demo = build_demo(ctx)
    demo.queue(default_concurrency_limit=max(1, concurrency), max_size=256)
    demo.launch(server_name=host, server_port=port, share=False, auth=auth,
                max_file_size=f"{max_upload_mb:g}mb", head=BRIDGE_JS, css=CSS,
                show_error=True, prevent_thread_lock=prevent_thread_lock, quiet=True,
                allowed_paths=[str(ctx.export_dir)])
    return demo


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    auth = parse_auth(args.auth)
    backend = make_backend(args)
    try:
        ctx = build_context(args, backend)
    except ValueError as exc:
        raise SystemExit(f"rsvlm-app: {exc}") from exc
    print(f"rsvlm-app: http://{args.host}:{args.port}  (model: {backend.info.get('preset')}, "
          f"{backend.info.get('state', 'ready')})", flush=True)
    launch(ctx, host=args.host, port=args.port, auth=auth, concurrency=args.concurrency,
           max_upload_mb=args.max_upload_mb)


if __name__ == "__main__":
    main()
