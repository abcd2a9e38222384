"""The detector's levels of the vision tower through ONNX Runtime (CPU; float32 or int8).

`rsvlm.perception.Perception.features` runs the tower's embeddings and its blocks up to the
deepest level the detector reads. On 2 CPU cores ONNX Runtime runs the same blocks 1.8 times as
fast as PyTorch (DINOv2-S, four crops at 336 px: 0.385 s against 0.684 s; docs/benchmarks.md,
round 10), and the tower is most of a detector answer's time.

The position embeddings are interpolated to the read size when the graph is traced, so there is
one graph per size (the batch is free). Each is exported the first time that size is read,
checked against PyTorch, and kept in the cache for these weights; a size that fails to export
or to agree is read by PyTorch from then on.

``quantize="int8"`` stores the blocks' matrix weights in int8 (ONNX Runtime dynamic
quantization of the MatMuls; the patch embedding stays float32): about twice as fast again on
2 cores. Its levels are not equal to PyTorch's, so the graph is checked by how closely each
token's vector points the same way (`MIN_COSINE`) instead; whether the detector's answers hold
is measured by `scripts/experiments/int8_tower.sh`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tiles.atomic import atomic_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
QUANTIZE = (None, "int8")
KEEP_EXPORTS = 8  # graphs kept in the cache (a prepared size and a set of weights each; ~80 MB)
_GRAPH = "tower.onnx"
_META = "tower.json"
TOLERANCE = 1e-3  # largest difference from PyTorch, relative to the levels' largest value
MIN_COSINE = 0.98  # int8: the mean cosine between a token's int8 and float32 vectors, per level


class TowerLevels(nn.Module):
    """``pixel values -> hidden states at levels`` (all tokens) of a ViT with `embeddings` and
    `encoder.layer` (DINOv2, as `Perception.features` runs it)."""

    def __init__(self, vision: nn.Module, layers: list[int]) -> None:
        super().__init__()
        self.vision = vision
        self.layers = sorted(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.vision.embeddings(x)
        out = []
        for i, block in enumerate(self.vision.encoder.layer[:max(self.layers)], start=1):
            hidden = block(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            if i in self.layers:
                out.append(hidden)
        return tuple(out)


def supported(vision: nn.Module) -> bool:
    """A ViT of embeddings and blocks, in float32 on the CPU: what ONNX Runtime runs here."""
    param = next(vision.parameters(), None)
    return (param is not None and param.device.type == "cpu" and param.dtype == torch.float32
            and hasattr(vision, "embeddings")
            and getattr(getattr(vision, "encoder", None), "layer", None) is not None)


def weights_digest(vision: nn.Module, layers: list[int], quantize: str | None = None) -> str:
    import onnxruntime
    import transformers

    from rsvlm.onnx_decode import graph_key

    return graph_key(vision, {"format": FORMAT_VERSION, "layers": sorted(layers),
                              "torch": torch.__version__,
                              "transformers": transformers.__version__,
                              "onnxruntime": onnxruntime.__version__,
                              "class": type(vision).__name__,
                              **({"quantize": quantize} if quantize else {})})


class OnnxTower:
    """The levels ``layers`` of ``vision`` through ONNX Runtime, one graph per read size;
    ``quantize`` None (float32) or ``"int8"``."""

    def __init__(self, vision: nn.Module, layers: list[int], *, cache_dir: str | Path | None = None,
                 threads: int | None = None, quantize: str | None = None) -> None:
        if quantize not in QUANTIZE:
            raise ValueError(f"Unknown tower quantization {quantize!r}; choose None or 'int8'.")
        if cache_dir is None:
            from rsvlm.weights import default_cache_dir

            cache_dir = default_cache_dir() / "onnx-towers"
        self.graph = TowerLevels(vision, layers).eval()
        self.layers = sorted(layers)
        self.cache_dir = Path(cache_dir)
        self.threads = threads
        self.quantize = quantize
        self.key = weights_digest(vision, layers, quantize)
        self.sessions: dict[int, Any] = {}
        self.failed: set[int] = set()

    def levels(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """The hidden states at the levels for pixel values ``x`` (batch, 3, size, size); None
        when no graph of this size is open (PyTorch reads it then).

        Only the sizes `prepare` opened run here. A chip finer than the training views is read
        at a size of its own (`rsvlm.perception.read_size`: any multiple of the patch between
        half and the whole input size), so graphs opened on demand would make each new drawn
        box wait for an export and keep one more graph in memory for the server's life."""
        size = int(x.shape[-1])
        session = self.sessions.get(size)
        if session is None or x.shape[-2] != size:
            return None
        out = session.run(None, {"pixel_values": x.detach().contiguous().numpy()})
        return [torch.from_numpy(o) for o in out]

    def prepare(self, sizes: list[int]) -> None:
        """Export (once for these weights) and open the graphs of ``sizes`` now, so that the
        first chip read at one does not wait for its export (about 7 s for DINOv2-S)."""
        for size in sizes:
            if size not in self.sessions and size not in self.failed:
                self._session(size)

    def _session(self, size: int) -> Any:
        folder = self.cache_dir / f"{self.key}-{size}"
        try:
            if not (folder / _META).is_file():
                self._export(folder, size)
            with contextlib.suppress(OSError):
                os.utime(folder / _META)  # recently used: kept by `_prune`
            session = self._open(folder / _GRAPH)
        except Exception as exc:  # a faster path only: never the reason a chip goes unread
            logger.warning("Vision tower at %d px stays on PyTorch (%s: %s).", size,
                           type(exc).__name__, exc)
            self.failed.add(size)
            return None
        self.sessions[size] = session
        return session

    def _open(self, path: Path) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _export(self, folder: Path, size: int) -> None:
        started = time.perf_counter()
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        names = [f"level{i}" for i in self.layers]
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Another process may finish the same export first: then its copy stays.
        with atomic_path(folder, folder=True, replace=False) as tmp:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on frozen Python branches
                torch.onnx.export(self.graph, (example,), str(tmp / _GRAPH),
                                  input_names=["pixel_values"], output_names=names,
                                  dynamic_axes={"pixel_values": {0: "batch"}},
                                  opset_version=17, dynamo=False)
                expected = self.graph(example)
            got = self._open(tmp / _GRAPH).run(None, {"pixel_values": example.numpy()})
            scale = max(float(e.abs().max()) for e in expected)
            diff = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected,
                                                                         strict=True))
            if diff > TOLERANCE * max(scale, 1.0):
                raise RuntimeError(f"the graph differs from PyTorch by {diff:.3g}")
            meta = {"format": FORMAT_VERSION, "size": size, "max_difference": diff,
                    "quantize": self.quantize}
            if self.quantize == "int8":
                meta["mean_cosine"] = _quantized(tmp / _GRAPH, self._open, example, expected)
            (tmp / _META).write_text(json.dumps(meta, indent=1))
        logger.info("Vision tower at %d px exported to ONNX Runtime in %.1f s", size,
                    time.perf_counter() - started)
        _prune(self.cache_dir, KEEP_EXPORTS)


def _quantized(path: Path, open_session: Any, example: torch.Tensor,
               expected: tuple[torch.Tensor, ...]) -> float:
    """Replace the float32 graph at ``path`` by its int8 one, checked against ``expected`` (the
    PyTorch levels of ``example``); the lowest level's mean cosine."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = path.with_suffix(".fp32.onnx")
    path.rename(source)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it warns on the root logger to "run pre-processing"
    try:
        # MatMuls only: the blocks' weights are most of the time; a quantized patch
        # embedding (a Conv) would shift every token alike.
        quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
    source.unlink()
    got = open_session(path).run(None, {"pixel_values": example.numpy()})
    cosines = [float(torch.nn.functional.cosine_similarity(torch.from_numpy(g), e, dim=-1).mean())
               for g, e in zip(got, expected, strict=True)]
    if min(cosines) < MIN_COSINE:
        raise RuntimeError(f"the int8 graph's levels point elsewhere (mean cosine "
                           f"{min(cosines):.3f} < {MIN_COSINE})")
    return min(cosines)


def _prune(cache_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently used graphs."""
    exports = sorted((p for p in cache_dir.iterdir() if (p / _META).is_file()),
                     key=lambda p: (p / _META).stat().st_mtime, reverse=True)
    for old in exports[keep:]:
        shutil.rmtree(old, ignore_errors=True)
