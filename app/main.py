"""``rsvlm-app``: parse arguments, load the region, start the model loading, serve the page."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
import tempfile
from pathlib import Path

from app.auth import ENV_VAR as AUTH_ENV_VAR
from app.auth import load_credentials, throttled_auth
from app.backend import Backend, EngineBackend, FakeBackend, LoadingBackend
from app.handlers import AppContext
from app.osm_panel import AreaStore, prompt_lines
from app.region import DEMO_REGION, Region

log = logging.getLogger("app")

#: Session folders left by an earlier run are removed at start-up after this long.
SESSION_MAX_AGE_S = 6 * 3600


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
                        ".osm.pbf extract or vector file, 'none' shows none (the default: the "
                        "app makes no network connection unless asked)")
    p.add_argument("--overpass-url", default=None, metavar="URL",
                   help="Overpass interpreter URL for --osm auto (default $RSVLM_OVERPASS_URL "
                        "or overpass-api.de)")
    p.add_argument("--auth-file", default=None, metavar="FILE",
                   help="require a login: USER:PASSWORD lines in FILE (chmod 600); or set "
                        f"${AUTH_ENV_VAR}=USER:PASSWORD")
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="deprecated: visible to every local user in `ps`; use --auth-file")
    p.add_argument("--max-upload-mb", type=float, default=50.0)
    p.add_argument("--concurrency", type=int, default=2,
                   help="model requests served at once (the rest wait in the queue)")
    p.add_argument("--chip-size", type=int, default=512, help="longest side of a chip, px")
    p.add_argument("--basemaps", action="store_true",
                   help="offer internet basemaps (satellite, OSM) when the basemap host answers; "
                        "without it the app makes no network connection of its own")
    p.add_argument("--offline", action="store_true",
                   help="never offer internet basemaps (the default; wins over --basemaps)")
    p.add_argument("--files-dir", default=None,
                   help="where session folders (uploads, exports) live (default: a private "
                        "folder in the system temp dir); emptied by age at start-up")
    p.add_argument("--adapter", default=None,
                   help="LoRA adapter folder for a pretrained --model (rsvlm-train fit --base)")
    p.add_argument("--allow-untrained", action="store_true",
                   help="allow a preset whose connector is untrained (large): answers are noise")
    p.add_argument("--no-semantic-context", action="store_true",
                   help="ablation: keep retrieved descriptions and OSM tags out of the prompt")
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


def make_backend(args: argparse.Namespace, osm_areas: AreaStore | None = None) -> Backend:
    if args.fake_model:
        return FakeBackend()
    quantize = {"4bit": True, "none": False}.get(args.quantize)
    return LoadingBackend(lambda progress: EngineBackend.load(
        args.model, device=args.device, quantize=quantize, progress=progress,
        decode=args.decode, adapter=getattr(args, "adapter", None),
        allow_untrained=getattr(args, "allow_untrained", False),
        semantic_context=not getattr(args, "no_semantic_context", False),
        osm=_prompt_osm(args, osm_areas)),
        name=args.model or "default")


def _prompt_osm(args: argparse.Namespace, osm_areas: AreaStore | None):
    """``osm(chip)`` lines for a pretrained model's prompt context: the region's OSM features
    on the region, the features fetched for an upload or tile (`--osm`) elsewhere."""
    region = None
    if args.region:
        try:
            region = Region.load(args.region)
        except Exception:  # the app still starts; the region loader reports the problem itself
            region = None
    if (region is None or region.osm is None) and not getattr(args, "osm", None):
        return None
    store = osm_areas if osm_areas is not None else AreaStore()
    return functools.partial(prompt_lines, region, store)


def build_context(args: argparse.Namespace, backend: Backend,
                  osm_areas: AreaStore | None = None) -> AppContext:
    region = Region.load(args.region) if args.region else None
    files_dir = Path(args.files_dir) if args.files_dir else \
        Path(tempfile.gettempdir()) / f"rsvlm-app-{os.getuid() if hasattr(os, 'getuid') else 0}"
    # The only network probe: made when basemaps are asked for, never by default.
    online = bool(args.basemaps) and not args.offline and network_reachable()
    log.info("basemaps: %s", "online (xyzservices)" if online else "offline (local imagery only)")
    osm = make_osm_source(args)
    ctx = AppContext(backend=backend, region=region, export_dir=files_dir,
                     chip_size=args.chip_size, max_upload_mb=args.max_upload_mb, online=online,
                     osm=osm, osm_areas=osm_areas if osm_areas is not None else AreaStore())
    st = files_dir.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o077):
        raise ValueError(f"{files_dir} (for uploads and exports) must be a folder of this user "
                         "that no one else can read; remove it or give --files-dir")
    ctx.files.sweep(SESSION_MAX_AGE_S)
    return ctx


def make_osm_source(args: argparse.Namespace):
    """The OSM source for imagery outside the region (`training.osm_source`), or None."""
    from training.osm_source import open_osm

    choice = getattr(args, "osm", None) or "none"  # Overpass sees the area: only when asked
    if choice == "auto" and getattr(args, "offline", False):
        raise ValueError("--osm auto asks an Overpass server on the internet; --offline "
                         "forbids it (give --osm FILE.osm.pbf)")
    try:
        # Bounded: an upload waits for its area's features at most this long.
        osm = open_osm(choice, endpoint=getattr(args, "overpass_url", None), timeout_s=20.0)
    except RuntimeError as exc:  # OSMError: a missing file or a bad URL
        raise ValueError(str(exc)) from exc
    log.info("OSM features outside the region: %s", osm.description if osm else "none")
    return osm


def launch(ctx: AppContext, *, host: str, port: int, auth: dict[str, str] | None,
           concurrency: int, max_upload_mb: float, prevent_thread_lock: bool = False):
    import threading

    from starlette.middleware import Middleware

    from app.guards import quiet_gradio_input_errors
    from app.layout import CSS, build_demo
    from app.map_html import BRIDGE_JS, warm_up
    from app.serving import OwnedFiles

    quiet_gradio_input_errors()
    # leafmap takes seconds to import: build the map page while the server starts.
    threading.Thread(target=warm_up, args=(ctx.online,), name="map-warm-up", daemon=True).start()
    demo = build_demo(ctx)
    demo.queue(default_concurrency_limit=max(1, concurrency), max_size=256)
    # Session folders are never in allowed_paths: Gradio serves only its own cache copies of
    # what a handler returns (see app.files).
    # OwnedFiles: a session's exports are served to the browser that made them only.
    demo.launch(server_name=host, server_port=port, share=False,
                auth=throttled_auth(auth) if auth else None,
                app_kwargs={"middleware": [Middleware(OwnedFiles, owners=ctx.files.owners)]},
                max_file_size=f"{max_upload_mb:g}mb", head=BRIDGE_JS, css=CSS,
                show_error=True, prevent_thread_lock=prevent_thread_lock, quiet=True)
    return demo


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # GDAL's own note on a rejected file repeats what app.rejected says, with the server path.
    logging.getLogger("rasterio._env").setLevel(logging.WARNING)
    auth = load_credentials(args.auth_file, args.auth)
    from tiles import tune_allocator

    tune_allocator()  # freed decode buffers go back to the system (see tiles.limits)
    osm_areas = AreaStore()  # what uploads fetched, shared with the model's prompt context
    backend = make_backend(args, osm_areas)
    try:
        ctx = build_context(args, backend, osm_areas)
    except ValueError as exc:
        raise SystemExit(f"rsvlm-app: {exc}") from exc
    print(f"rsvlm-app: http://{args.host}:{args.port}  (model: {backend.info.get('preset')}, "
          f"{backend.info.get('state', 'ready')})", flush=True)
    launch(ctx, host=args.host, port=args.port, auth=auth, concurrency=args.concurrency,
           max_upload_mb=args.max_upload_mb)


if __name__ == "__main__":
    main()
