"""Memory budgets for decoding imagery, and the pixel counts that follow from them.

A tiny file can hold a huge picture (a 13000 x 13000 PNG of one colour compresses to 500 KB),
so what is checked is what decoding will *allocate*, read from the header before any pixel is
decoded. One budget (``RSVLM_DECODE_BUDGET_MB``, default 192 MB per decode) sets:

- how many pixels a plain picture is decoded to (`working_pixels`): larger JPEGs are decoded at
  1/2, 1/4 or 1/8 scale by libjpeg (Pillow's draft mode), larger non-interlaced PNGs are read in
  row strips by GDAL and averaged down, so neither ever holds the full-resolution picture;
- which pictures are refused (`check_whole_decode`): formats that can only be decoded whole
  (WebP, interlaced PNG, GIF, BMP, TIFF without GDAL...) above `working_pixels`;
- the largest raster block GDAL may have to decompress at once (`max_block_bytes`): a GeoTIFF
  stored as one 500 MB strip is refused, a tiled one of any size is read by windows.

Streamed decoding still costs CPU in proportion to the picture (about 3 s per 100 Mpx of PNG on
one core), so `MAX_STREAMED_PIXELS` caps that as well.
"""

from __future__ import annotations

import os

from tiles.errors import ImageryError

DEFAULT_DECODE_BUDGET_MB = 192
#: Bytes a decoded pixel costs at the peak of opening a picture and taking its first chips:
#: the decoder's RGBX image (4), the NumPy RGB copy (3), a converted copy (4) and the resize
#: source of a chip (4). Measured: a 4270 x 4270 WebP peaks at about 15 bytes per pixel; 20
#: leaves room for two at once within +500 MB.
BYTES_PER_DECODED_PIXEL = 20
#: Largest picture decoded by streaming (row strips, DCT scaling); beyond this the CPU time
#: (not the memory) is what a tiny hostile file would cost.
MAX_STREAMED_PIXELS = 400_000_000


def decode_budget_bytes() -> int:
    """Bytes one decode may allocate (``RSVLM_DECODE_BUDGET_MB`` overrides the default)."""
    text = os.environ.get("RSVLM_DECODE_BUDGET_MB", "")
    try:
        mb = float(text) if text.strip() else DEFAULT_DECODE_BUDGET_MB
    except ValueError:
        mb = DEFAULT_DECODE_BUDGET_MB
    return int(max(mb, 16) * 2**20)


def working_pixels() -> int:
    """Pixels a plain picture is decoded to at most (10 Mpx, about 3170 x 3170, by default)."""
    return decode_budget_bytes() // BYTES_PER_DECODED_PIXEL


def max_block_bytes() -> int:
    """Largest block (strip or tile, all interleaved bands) a raster read may decompress."""
    return decode_budget_bytes() // 2


def describe_mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MB"


def check_whole_decode(name: str, width: int, height: int, fmt: str) -> None:
    """Refuse a picture that must be decoded whole and would not fit the budget."""
    if width * height > working_pixels():
        raise ImageryError(
            f"{name!r} is {width}x{height} px ({width * height / 1e6:.0f} Mpx). {fmt} pictures are "
            f"decoded whole, and this one would need about "
            f"{describe_mb(width * height * BYTES_PER_DECODED_PIXEL)}; the limit is "
            f"{working_pixels() / 1e6:.1f} Mpx. Save it as JPEG or non-interlaced PNG, or as a "
            "tiled GeoTIFF (`gdal_translate -of COG`), which are read at reduced resolution."
        )


def check_streamed(name: str, width: int, height: int) -> None:
    """Refuse a picture too large even to stream through once."""
    if width * height > MAX_STREAMED_PIXELS:
        raise ImageryError(
            f"{name!r} is {width}x{height} px ({width * height / 1e6:.0f} Mpx), too large to open "
            f"as a plain image (limit {MAX_STREAMED_PIXELS / 1e6:.0f} Mpx); convert it to a tiled "
            "GeoTIFF with overviews (`gdal_translate -of COG`)."
        )


def _libc():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


#: glibc ``mallopt`` parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_allocator(mmap_threshold: int = 1 << 20) -> bool:
    """Serve allocations above ``mmap_threshold`` with mmap so that freeing a decoded picture
    gives its memory back to the system. (glibc raises its threshold to the largest block
    freed, up to 32 MB, so the arrays of a bomb would otherwise stay in the heap as RSS after
    the request.) Linux/glibc only; returns whether it applied."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, 4 * mmap_threshold))


def release_memory() -> None:
    """Return freed heap memory to the system after a large decode (``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
