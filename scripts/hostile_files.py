"""Hostile imagery files for `scripts/fuzz_app.py` and the memory tests, written without ever
holding their pixels: GDAL streams a source-less VRT (all zeros, or a stripe pattern through a
tiny tiled source) into the target format row by row, and PNG bombs are deflated row by row.

    python scripts/hostile_files.py OUT_DIR      # writes every file and lists sizes
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

#: What the issue's tester uploaded: 494 KB that decode to 13000 x 13000 px.
BOMB_SIDE = 13000


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bomb(path: Path, side: int = BOMB_SIDE, *, interlaced: bool = False,
             forged: bool = False) -> Path:
    """An RGB PNG of ``side`` x ``side`` px whose rows are mostly zeros (compresses ~1000:1).

    ``forged``: the header claims the size but the data is one short row (a truncated file).
    ``interlaced``: Adam7 flag set (the data is then only valid when forged; decoders that
    honour the flag must decode the whole picture, which is what is being tested)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 1 if interlaced else 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr))
        if forged or interlaced:
            f.write(_chunk(b"IDAT", zlib.compress(b"\x00" * 64)))
        else:
            comp = zlib.compressobj(6)
            row = bytearray(1 + 3 * side)
            row[1::97] = b"\xff" * len(row[1::97])  # a little texture: not one flat colour
            out = bytearray()
            for _ in range(side):
                out += comp.compress(bytes(row))
                if len(out) > 1 << 20:
                    f.write(_chunk(b"IDAT", bytes(out)))
                    out.clear()
            out += comp.flush()
            f.write(_chunk(b"IDAT", bytes(out)))
        f.write(_chunk(b"IEND", b""))
    return path


def _vrt(width: int, height: int, bands: int, dtype: str = "Byte", *,
         georef: bool = True, fill: float | None = None) -> str:
    """A VRT with no sources: every pixel reads as ``fill`` (0 by default), streamed by GDAL."""
    geo = ('<SRS>EPSG:3857</SRS><GeoTransform>3628312.86, 0.15, 0, 39135.76, 0, -0.15'
           '</GeoTransform>') if georef else ""
    init = f"<NoDataValue>{fill}</NoDataValue>" if fill is not None else ""
    body = "".join(f'<VRTRasterBand dataType="{dtype}" band="{b}">{init}</VRTRasterBand>'
                   for b in range(1, bands + 1))
    return f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">{geo}{body}</VRTDataset>'


def gdal_copy(path: Path, width: int, height: int, bands: int, driver: str, *,
              dtype: str = "Byte", georef: bool = True, fill: float | None = None,
              **options: str) -> Path:
    """Stream a constant raster into ``driver`` (creation ``options`` as GDAL -co)."""
    import warnings

    import rasterio.shutil

    vrt = _vrt(width, height, bands, dtype, georef=georef, fill=fill)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no georeference" for pictures: intended
        rasterio.shutil.copy(vrt, path, driver=driver, **options)
    for extra in path.parent.glob(path.name + ".aux.xml"):
        extra.unlink()
    return path


def jpeg_bomb(path: Path, side: int = BOMB_SIDE) -> Path:
    return gdal_copy(path, side, side, 3, "JPEG", georef=False, QUALITY="50")


def webp_at(path: Path, side: int) -> Path:
    return gdal_copy(path, side, side, 3, "WEBP", georef=False, QUALITY="10")


def webp_forged(path: Path, side: int = BOMB_SIDE) -> Path:
    """A valid animated WebP with a ``side`` x ``side`` canvas (libwebp's limit is 16383) and
    one 16 x 16 frame: 1 KB that a decoder turns into a ~1 GB RGBA canvas."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 60)).save(buf, format="WEBP", lossless=True)
    frame = buf.getvalue()[12:]  # the VP8L chunk after "RIFF....WEBP"

    def u24(v: int) -> bytes:
        return v.to_bytes(3, "little")

    vp8x = _riff_chunk(b"VP8X", bytes([0x02, 0, 0, 0]) + u24(side - 1) + u24(side - 1))
    anim = _riff_chunk(b"ANIM", b"\x00\x00\x00\x00" + struct.pack("<H", 0))
    anmf = _riff_chunk(b"ANMF", u24(0) + u24(0) + u24(15) + u24(15) + u24(100) + b"\x00"
                       + frame)
    body = b"WEBP" + vp8x + anim + anmf
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def _riff_chunk(kind: bytes, payload: bytes) -> bytes:
    pad = b"\x00" if len(payload) % 2 else b""
    return kind + struct.pack("<I", len(payload)) + payload + pad


def geotiff_no_overviews(path: Path, side: int = 12000) -> Path:
    """A tiled, compressed 12000 x 12000 RGB GeoTIFF with no overviews (432 MB of pixels)."""
    return gdal_copy(path, side, side, 3, "GTiff", TILED="YES", COMPRESS="DEFLATE")


def geotiff_one_strip(path: Path, side: int = 6000) -> Path:
    """A GeoTIFF stored as one deflated strip of ``side`` x ``side`` RGB (GDAL streams such a
    strip row by row; the writer holds it whole, so keep ``side`` modest)."""
    return gdal_copy(path, side, side, 3, "GTiff", COMPRESS="DEFLATE", BLOCKYSIZE=str(side))


def geotiff_huge_tile(path: Path, side: int = 8192) -> Path:
    """A GeoTIFF whose one tile is ``side`` x ``side`` x 3 (200 MB): any read decompresses the
    whole tile. Written sparse (header only), which is all the refusal needs."""
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3,
                       dtype="uint8", crs="EPSG:3857", transform=from_origin(0, 0, 1, 1),
                       tiled=True, blockxsize=side, blockysize=side, compress="deflate",
                       SPARSE_OK=True):
        pass
    return path


def many_bands(path: Path, bands: int = 200, side: int = 2000, interleave: str = "PIXEL") -> Path:
    """A pixel-interleaved many-band raster: every tile holds all bands."""
    return gdal_copy(path, side, side, bands, "GTiff", TILED="YES", COMPRESS="DEFLATE",
                     INTERLEAVE=interleave)


def all_nan(path: Path, side: int = 256) -> Path:
    """A float32 GeoTIFF whose every pixel is NaN."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3,
                       dtype="float32", crs="EPSG:3857",
                       transform=from_origin(3628312.86, 39135.76, 0.15, 0.15)) as ds:
        ds.write(np.full((3, side, side), np.nan, np.float32))
    return path


def all_nodata(path: Path, side: int = 256) -> Path:
    """A uint8 GeoTIFF whose every pixel is its nodata value."""
    return gdal_copy(path, side, side, 3, "GTiff", fill=0)


def memory_worst_cases(folder: Path) -> dict[str, Path]:
    """The inputs the memory bound must hold for (the test and the fuzz script use these)."""
    from tiles import limits

    folder.mkdir(parents=True, exist_ok=True)
    webp_side = int(limits.working_pixels() ** 0.5) - 8  # the largest WebP that is decoded
    return {
        "png_bomb_13000": png_bomb(folder / "bomb.png"),
        "jpeg_bomb_13000": jpeg_bomb(folder / "bomb.jpg"),
        f"webp_{webp_side}": webp_at(folder / "largest.webp", webp_side),
        "webp_bomb_13000": webp_forged(folder / "bomb.webp"),
        "geotiff_12000_no_overviews": geotiff_no_overviews(folder / "huge.tif"),
        "geotiff_one_strip_6000": geotiff_one_strip(folder / "strip.tif"),
        "geotiff_one_8192_tile": geotiff_huge_tile(folder / "tile.tif"),
        "bands_200_pixel_interleaved": many_bands(folder / "bands.tif"),
    }


def rss_mb(pid: int | None = None) -> float | None:
    """Resident memory of process ``pid`` (this one when None) in MiB; None once it is gone.
    Shared with scripts/fuzz_app.py and scripts/load_app.py, which watch a server's."""
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def _rss_mb() -> float:
    return rss_mb() or 0.0


class _PeakSampler:
    """Samples RSS every few milliseconds in a thread: the peak of a window of work."""

    def __init__(self) -> None:
        import threading

        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def measure_peak_rss(cases: dict[str, Path], concurrent: int = 2, api: bool = True
                     ) -> dict[str, object]:
    """Peak RSS growth of this process over its resident memory before each case, while the
    app's handlers take that case ``concurrent`` times at once (an upload: preview + chip; then
    a stateless API question unless ``api`` is False). RSS is sampled every 5 ms."""
    import threading
    import time

    from app import handlers as h
    from app.backend import FakeBackend
    from tiles.limits import release_memory, tune_allocator

    tune_allocator()  # as rsvlm-app does at start-up
    ctx = h.AppContext(backend=FakeBackend(), region=None,
                       export_dir=Path(next(iter(cases.values()))).parent / "exports")
    small = cases.get("_warmup")
    if small is not None:  # import and warm every lazily loaded module before the baseline
        h.upload(ctx, h.SessionState(), str(small))
    outcomes: dict[str, list[str]] = {}

    def take(name: str, path: Path) -> None:
        state = h.SessionState()
        h.upload(ctx, state, str(path))
        answer = "no API call"
        try:
            if api:
                h.api_ask(ctx, str(path), "", "Describe this image.")
                answer = "answered"
        except h.UserError as exc:
            answer = f"refused: {str(exc)[:60]}"
        release_memory()  # as the app's Gradio wrappers do after each call
        outcomes.setdefault(name, []).append(
            f"upload: {'ok' if state.chip is not None else 'refused'}; {answer}")

    t0 = time.perf_counter()
    per_case = {}
    start, top = _rss_mb(), 0.0
    for name, path in cases.items():
        if name.startswith("_"):
            continue
        threads = [threading.Thread(target=take, args=(name, path)) for _ in range(concurrent)]
        base = _rss_mb()
        with _PeakSampler() as peak:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        per_case[name] = round(peak.peak - base, 1)
        top = max(top, peak.peak)
    # Both matter: one case's own peak, and what the process holds after all of them (freed
    # memory the allocator keeps counts as RSS too).
    return {"peak_growth_mb": round(top - start, 1),
            "peak_growth_per_case_mb": per_case, "rss_growth_at_end_mb": round(_rss_mb() - start, 1),
            "outcomes": {k: sorted(set(v)) for k, v in outcomes.items()},
            "seconds": round(time.perf_counter() - t0, 1), "concurrent": concurrent}


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    import time

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="hostile", help="folder for the files")
    p.add_argument("--rss", action="store_true",
                   help="then feed them to the app's handlers, two at once, and print the peak "
                        "RSS growth as JSON")
    p.add_argument("--upload-only", action="store_true",
                   help="measure the upload handler only (half the decodes: the test's mode)")
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    cases = memory_worst_cases(out)
    for name, path in cases.items():
        print(f"{name:32s} {path.stat().st_size / 1e3:10.0f} KB  {path}", file=sys.stderr)
    print(f"written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.rss:
        from PIL import Image

        warm = out / "warmup.png"
        Image.new("RGB", (64, 48), (10, 20, 30)).save(warm)
        print(json.dumps(measure_peak_rss({"_warmup": warm, **cases}, api=not args.upload_only),
                         indent=1))


if __name__ == "__main__":
    main()
