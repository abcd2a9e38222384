"""The language model's text steps in ONNX Runtime: the CPU path's fast loop.

On a CPU, `generate()` in PyTorch spends most of a decode step outside the matrix products that
must run (SmolLM2-135M: 75-95 ms a token on two cores in eager PyTorch against about 28 ms for
the same fp32 graph in ONNX Runtime, measured by ``scripts/bench_model.py``), and a follow-up
question's few prompt tokens take about 0.25 s in eager PyTorch. So the decoder (LoRA merged,
semantic experts included) is traced once into an ONNX graph that continues a key/value cache by
one or more text tokens, cached on disk under a hash of its weights. `OnnxDecode` is the decode
strategy (`rsvlm.decoding`) the chat engine picks for it: hooked around a ``generate()`` call, it
hands every plain text continuation of a non-empty KV cache (decode steps, and follow-up prompts)
to `OnnxDecodeStep.step`; the multimodal prefill, training and batches run in PyTorch as before,
and the KV cache stays a transformers `DynamicCache` that follow-up questions keep extending.

Expert routing in the graph: every token is a text token (all experts, softmax gate, see
`rsvlm.experts`), a fixed function of the hidden state, so the traced graph is exact for generated
tokens and for follow-up prompts, which hold no image or semantic tokens.

``quantize="int8"`` stores the graph's matrix weights in int8 (ONNX Runtime dynamic
quantization): about twice as fast again, at a small cost in agreement with the fp32 answers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tiles.atomic import atomic_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: any number of new tokens (follow-up prompts), not only one
# Larger decoders would need the external-data ONNX format and are faster on a GPU anyway.
MAX_PARAMETERS = 1_000_000_000
KEEP_EXPORTS = 4  # decoders kept in the cache (one per set of trained weights)
_GRAPH = "decoder.onnx"
_META = "decoder.json"


def _prune(cache_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently used exports (each is as large as the model)."""
    exports = sorted(
        (p for p in cache_dir.iterdir() if (p / _META).is_file()),
        key=lambda p: (p / _META).stat().st_mtime,
        reverse=True,
    )
    for old in exports[keep:]:
        shutil.rmtree(old, ignore_errors=True)


class _DecodeStepGraph(nn.Module):
    """``(input_ids, position_ids, past k/v per layer) -> (last logits, present k/v per layer)``
    around a stock causal LM: the signature the ONNX graph is traced with. ``input_ids`` holds one
    or more new tokens; the causal mask over the cache and the new tokens is built from the
    shapes inside the graph, so one graph serves decode steps and follow-up prompts."""

    def __init__(self, language_model: nn.Module) -> None:
        super().__init__()
        self.language_model = language_model
        self.num_layers = language_model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.language_model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        cached = past[0].shape[2]
        new = input_ids.shape[1]
        query = torch.arange(new).unsqueeze(1) + cached
        key = torch.arange(cached + new).unsqueeze(0)
        # (1, 1, new, cached + new), additive: a 4D mask reaches the attention as it is.
        mask = torch.where(key > query, float("-inf"), 0.0)[None, None]
        out = self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits[:, -1, :], *present)


def _names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "position_ids", *past], ["logits", *present]


def _kv_shape(config: Any, length: int) -> tuple[int, int, int, int]:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (1, heads, length, head_dim)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the decode step of ``model`` cannot run in ONNX Runtime here (None: it can)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    lm = getattr(model, "language_model", model)
    params = list(lm.parameters())
    if not params:
        return "the language model has no parameters"
    if params[0].device.type != "cpu":
        return f"the model is on {params[0].device.type}, not the CPU"
    if any(p.dtype != torch.float32 for p in params):
        return "the language model is not entirely float32 (quantized or half precision)"
    if any(hasattr(m, "lora_A") for m in lm.modules()):
        return "the LoRA adapter is not merged (load with merge_lora=True)"
    if sum(p.numel() for p in params) > MAX_PARAMETERS:
        return "the language model is too large for a single-file ONNX graph"
    return None


def weights_key(language_model: nn.Module, quantize: str | None) -> str:
    """A hash of everything the graph depends on: the weights, their names, the versions."""
    import onnxruntime
    import transformers

    header = {
        "format": FORMAT_VERSION,
        "quantize": quantize,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "config": language_model.config.to_json_string(use_diff=False),
        "class": type(language_model).__name__,
    }
    return graph_key(language_model, header)


def graph_key(module: nn.Module, header: dict[str, Any]) -> str:
    """A hash of ``header`` (what else a graph depends on) and of ``module``'s weights: names,
    shapes, types and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(header, sort_keys=True).encode())
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def export(language_model: nn.Module, path: str | Path, *, quantize: str | None = None) -> None:
    """Trace the decode step of ``language_model`` into an ONNX file at ``path``."""
    path = Path(path)
    config = language_model.config
    num_layers = config.num_hidden_layers
    inputs, outputs = _names(num_layers)
    past_len = 8
    # Two new tokens, so that nothing about the new length is frozen into the trace.
    example = [torch.tensor([[0, 1]]), torch.tensor([[past_len, past_len + 1]])]
    example += [torch.zeros(_kv_shape(config, past_len)) for _ in range(2 * num_layers)]
    dynamic = {name: {1: "new"} for name in inputs[:2]}
    dynamic.update({name: {2: "past"} for name in inputs[2:]})
    dynamic.update({name: {2: "total"} for name in outputs[1:]})
    graph = _DecodeStepGraph(language_model).eval()
    target = path if quantize is None else path.with_suffix(".fp32.onnx")
    with (
        torch.no_grad(),
        warnings.catch_warnings(),
        _text_routing(language_model),
        _grouped_query_attention(language_model),
    ):
        # The tracer warns about every Python branch it freezes; a text continuation of a
        # cache is the only path this graph is ever run on.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            tuple(example),
            str(target),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    _fold(target)
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # it warns on the root logger to "run pre-processing"
        try:
            quantize_dynamic(
                str(target),
                str(path),
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            root.setLevel(level)
        target.unlink()
    elif quantize is not None:
        raise ValueError(f"Unknown quantization {quantize!r}; choose None or 'int8'.")


def _fold(path: Path) -> None:
    """Fold the graph's shape arithmetic in place (`rsvlm.onnx_shapes`); keeps it as traced when
    shape inference cannot handle it (slower by a few percent, same results)."""
    from rsvlm.onnx_shapes import fold_shapes

    try:
        with atomic_path(path) as folded:
            changed = fold_shapes(path, folded)
    except Exception as exc:  # an optimisation only: never the reason a decoder is missing
        logger.info("Decoder graph kept unfolded (%s: %s).", type(exc).__name__, exc)
        return
    logger.debug("Folded shape nodes: %s", dict(changed))


class OnnxDecodeStep:
    """An ONNX Runtime session for one decoder's text step (see the module docstring)."""

    def __init__(self, path: str | Path, *, num_layers: int, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.num_layers = num_layers
        self.session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self.input_names, self.output_names = _names(num_layers)
        meta = self.path.with_name(_META)
        quantize = json.loads(meta.read_text()).get("quantize") if meta.is_file() else None
        self.mode = "onnx-int8" if quantize == "int8" else "onnx"
        self.steps = 0

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        quantize: str | None = None,
        cache_dir: str | Path | None = None,
        check: bool = True,
    ) -> OnnxDecodeStep:
        """The decode step of ``model`` (an RSVLM model or a bare causal LM): loaded from the cache
        when these exact weights were exported before, else exported (once, logged) and checked
        against PyTorch. Raises `RuntimeError` when it cannot run here (see `unsupported_reason`)
        or when the graph disagrees with PyTorch."""
        reason = unsupported_reason(model)
        if reason:
            raise RuntimeError(f"No ONNX Runtime decoder: {reason}.")
        lm = getattr(model, "language_model", model)
        if cache_dir is None:
            from rsvlm.weights import default_cache_dir

            cache_dir = default_cache_dir() / "onnx-decoders"
        key = weights_key(lm, quantize)
        folder = Path(cache_dir) / key
        num_layers = lm.config.num_hidden_layers
        if not (folder / _META).is_file():
            started = time.perf_counter()
            logger.info("Exporting the decoder to ONNX Runtime (once for these weights)...")
            folder.parent.mkdir(parents=True, exist_ok=True)
            # Another process may finish the same export first: then its copy stays.
            with atomic_path(folder, folder=True, replace=False) as tmp:
                export(lm, tmp / _GRAPH, quantize=quantize)
                decoder = cls(tmp / _GRAPH, num_layers=num_layers)
                agreement = decoder.compare(lm, strict=quantize is None) if check else None
                meta = {"quantize": quantize, "agreement": agreement, "format": FORMAT_VERSION}
                (tmp / _META).write_text(json.dumps(meta, indent=1))
                del decoder
            logger.info("Decoder exported in %.1f s: %s", time.perf_counter() - started, folder)
            _prune(folder.parent, keep=KEEP_EXPORTS)
        with contextlib.suppress(OSError):
            os.utime(folder / _META)  # recently used: kept by `_prune`
        return cls(folder / _GRAPH, num_layers=num_layers)

    # ------------------------------------------------------------------ running
    def run(self, input_ids: torch.Tensor, position: int, past: list[torch.Tensor]):
        """New tokens ``(1, n)`` after ``position`` cached ones: the last token's logits
        ``(1, vocab)`` and the present keys/values (numpy arrays)."""
        ids = input_ids.reshape(1, -1).to(torch.int64).numpy()
        feed = {
            "input_ids": ids,
            "position_ids": np.arange(position, position + ids.shape[1], dtype=np.int64)[None],
        }
        for name, tensor in zip(self.input_names[2:], past, strict=True):
            feed[name] = tensor.detach().contiguous().numpy()
        out = self.session.run(None, feed)
        self.steps += 1
        return out[0], out[1:]

    def can_step(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: Any,
    ) -> bool:
        """True for a plain continuation (one row of new token ids) of a non-empty, unpadded
        `DynamicCache`. The caller makes sure the new tokens are text (see the module doc)."""
        from transformers import DynamicCache

        if input_ids is None or input_ids.ndim != 2 or input_ids.shape[0] != 1:
            return False
        if input_ids.shape[1] == 0:
            return False
        if not isinstance(cache, DynamicCache) or len(cache.layers) != self.num_layers:
            return False
        if cache.get_seq_length() == 0 or any(
            type(layer).__name__ != "DynamicLayer" for layer in cache.layers
        ):
            return False
        return attention_mask is None or bool(attention_mask.all())

    def step(self, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """Run the new tokens through the graph, extend ``cache`` in place, return the last
        token's logits ``(1, 1, V)``."""
        position = cache.get_seq_length()
        past = []
        for layer in cache.layers:
            past += [layer.keys, layer.values]
        logits, present = self.run(input_ids, position, past)
        for i, layer in enumerate(cache.layers):
            layer.keys = torch.from_numpy(present[2 * i])
            layer.values = torch.from_numpy(present[2 * i + 1])
        return torch.from_numpy(logits).unsqueeze(1)

    def compare(
        self, language_model: nn.Module, *, strict: bool = True, past_len: int = 16, seed: int = 0
    ) -> float:
        """Check the graph against the stock PyTorch model, on one new token and on five (a
        follow-up prompt), after a random prompt; returns the max logit error relative to the
        logits' range and raises `RuntimeError` when the two disagree (``strict``: same top token
        and 1e-3 relative error in the logits and the new keys/values, for an fp32 graph)."""
        from transformers import DynamicCache

        generator = torch.Generator().manual_seed(seed)
        vocab = language_model.config.vocab_size
        prompt = torch.randint(0, vocab, (1, past_len), generator=generator)
        with torch.no_grad(), _text_routing(language_model):
            prompt_cache = DynamicCache(config=language_model.config)
            language_model(input_ids=prompt, past_key_values=prompt_cache, use_cache=True)
        past = [t for layer in prompt_cache.layers for t in (layer.keys, layer.values)]
        worst, correlation = 0.0, 1.0
        for new in (1, 5):
            tokens = torch.randint(0, vocab, (1, new), generator=generator)
            with torch.no_grad(), _text_routing(language_model):
                cache = copy.deepcopy(prompt_cache)
                out = language_model(input_ids=tokens, past_key_values=cache, use_cache=True)
                expected = out.logits[:, -1, :].numpy()
                expected_kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            got, present = self.run(tokens, past_len, past)
            scale = float(abs(expected).max()) or 1.0
            error = float(abs(got - expected).max()) / scale
            kv_error = max(
                float(abs(p - e.numpy()).max()) / (float(abs(e).max()) or 1.0)
                for p, e in zip(present, expected_kv, strict=True)
            )
            if strict and (
                error > 1e-3 or kv_error > 1e-3 or int(got.argmax()) != int(expected.argmax())
            ):
                raise RuntimeError(
                    f"ONNX decode step disagrees with PyTorch on {new} new token(s) "
                    f"(logits {error:.2e}, keys/values {kv_error:.2e})."
                )
            worst = max(worst, error)
            # int8 weights: not equal, but the logits must still move together.
            correlation = min(correlation, float(np.corrcoef(got.ravel(), expected.ravel())[0, 1]))
        if correlation < 0.9:
            raise RuntimeError(
                f"ONNX decode step is far from PyTorch (logit correlation {correlation:.3f})."
            )
        return round(worst, 6)


@contextlib.contextmanager
def _text_routing(language_model: nn.Module) -> Iterator[None]:
    """Every token routed as text (what a decode step sees) while tracing and checking."""
    from rsvlm.experts import expert_modules

    wrappers = expert_modules(language_model)
    saved = [w.token_types for w in wrappers]
    for w in wrappers:
        w.token_types = None
    try:
        yield
    finally:
        for w, types in zip(wrappers, saved, strict=True):
            w.token_types = types


_EXPORT_ATTENTION = "rsvlm_onnx_gqa"


def _grouped_query_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention on the key/value heads as they are: the query heads that share a key/value head
    become extra query rows of it. With a mask, transformers' SDPA path copies every cached key
    and value once per sharing query head (``repeat_kv``), and the ONNX exporter has no SDPA with
    grouped heads; that copy cost about a tenth of a decode step."""
    kv_heads, head_dim = key.shape[1], query.shape[-1]
    groups = getattr(module, "num_key_value_groups", 1)
    rows = query.reshape(1, kv_heads, -1, head_dim)  # (1, kv heads, groups * new, dim)
    scale = scaling if scaling is not None else head_dim**-0.5
    scores = torch.matmul(rows, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        scores = scores + attention_mask.repeat(1, 1, groups, 1)  # additive (1, 1, new, all)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value).reshape(1, kv_heads * groups, -1, head_dim)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _grouped_query_attention(language_model: nn.Module) -> Iterator[None]:
    """Trace ``language_model`` with `_grouped_query_attention_forward` as its attention."""
    from transformers import AttentionInterface

    AttentionInterface.register(_EXPORT_ATTENTION, _grouped_query_attention_forward)
    config = language_model.config
    saved = config._attn_implementation
    config._attn_implementation = _EXPORT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = saved


class OnnxDecode:
    """The ``onnx`` / ``onnx-int8`` `rsvlm.decoding.DecodeStrategy`: while hooked, the model's
    plain text continuations of a non-empty KV cache (decode steps and follow-up prompts) run in
    ``graph``; the multimodal prefill, training (gradients) and batches run in PyTorch as before.

    The hook replaces ``forward`` on the model instance for the length of the block (accelerate's
    hooks do the same); the class's ``forward`` knows nothing about it."""

    def __init__(self, graph: OnnxDecodeStep) -> None:
        self.graph = graph
        self.name = graph.mode

    def takes(self, model: nn.Module, kwargs: dict[str, Any]) -> bool:
        """Whether the graph can run this call of ``model.forward`` (keyword arguments)."""
        input_ids = kwargs.get("input_ids")
        return (
            kwargs.get("labels") is None
            and kwargs.get("pixel_values") is None
            and kwargs.get("inputs_embeds") is None
            and not torch.is_grad_enabled()
            and self.graph.can_step(input_ids, kwargs.get("attention_mask"),
                                    kwargs.get("past_key_values"))
            and not _has_non_text_tokens(model, input_ids, kwargs.get("token_types"))
        )

    @contextlib.contextmanager
    def hooked(self, model: nn.Module) -> Iterator[None]:
        from rsvlm.modeling import RSVLMCausalLMOutput

        saved = model.__dict__.get("forward")
        modeled = model.forward

        @functools.wraps(modeled)  # generate() reads the signature to validate its inputs
        def forward(*args: Any, **kwargs: Any) -> Any:
            if args or not self.takes(model, kwargs):
                return modeled(*args, **kwargs)
            cache = kwargs["past_key_values"]
            return RSVLMCausalLMOutput(
                logits=self.graph.step(kwargs["input_ids"], cache), past_key_values=cache
            )

        model.forward = forward
        try:
            yield
        finally:
            if saved is None:
                del model.forward
            else:
                model.forward = saved


def _has_non_text_tokens(
    model: nn.Module, input_ids: torch.Tensor, token_types: torch.Tensor | None
) -> bool:
    """Whether new tokens need image/semantic routing (the graph routes all as text)."""
    from rsvlm.experts import TOKEN_TYPE_TEXT

    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is not None and bool((input_ids == image_token_id).any()):
        return True
    if token_types is None:
        return False
    return bool((token_types[:, -input_ids.shape[1]:] != TOKEN_TYPE_TEXT).any())


def dispatch(model: nn.Module, mode: str, explicit: bool) -> OnnxDecode | None:
    """`rsvlm.decoding` dispatcher: an `OnnxDecode` for ``onnx``/``onnx-int8`` where ONNX Runtime
    can run ``model``; None otherwise (with a log line), or `RuntimeError` when ``explicit``."""
    if mode not in ("onnx", "onnx-int8"):
        return None
    from rsvlm.modeling import RSVLMForConditionalGeneration

    if isinstance(model, RSVLMForConditionalGeneration):
        reason = unsupported_reason(model)
    else:  # the hook routes RSVLM's text steps; other families decode in their own way
        reason = f"the ONNX decoder is built for rsvlm models, not {type(model).__name__}"
    if reason:
        if explicit:
            raise RuntimeError(f"Decode backend {mode!r} cannot run here: {reason}.")
        logger.info("Decoding in PyTorch: %s.", reason)
        return None
    quantize = "int8" if mode == "onnx-int8" else None
    try:
        return OnnxDecode(OnnxDecodeStep.for_model(model, quantize=quantize))
    except Exception as exc:
        if explicit:
            raise
        logger.warning("Decoding in PyTorch: the ONNX decoder failed (%s).", exc)
        return None


__all__ = [
    "OnnxDecode",
    "OnnxDecodeStep",
    "dispatch",
    "export",
    "unsupported_reason",
    "weights_key",
]
