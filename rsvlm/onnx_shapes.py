"""Fold a traced ONNX graph's shape arithmetic into constants where the shapes are known.

The decode graph (`rsvlm.onnx_decode`) is traced with a dynamic number of new tokens, so every
``view``/``reshape`` in transformers' attention code becomes a chain of ``Shape -> Gather ->
Unsqueeze -> Concat`` nodes that ONNX Runtime re-evaluates at every step: more than twice the
nodes of a graph traced for exactly one new token, which is a few percent of a 30 ms decode step
on two cores. Symbolic shape inference (ONNX Runtime's tool) knows most of these values, and the
rest differ in one dimension only, which ``Reshape`` takes as ``-1`` and ``Expand`` as a broadcast.

`fold_shapes` rewrites those nodes and drops what no output needs any more. It leaves the graph's
arithmetic untouched; the decode step's `compare` against PyTorch checks the result all the same.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Integer shape arithmetic whose value symbolic inference tracks (``sympy_data_``).
_SHAPE_OPS = {
    "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Div", "Mul", "Add", "Sub",
    "Slice", "Floor", "Reshape",
}  # fmt: skip


def _dims(value_info: Any) -> list[int | str | None]:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in value_info.type.tensor_type.shape.dim
    ]


def _known(values: Any) -> list[int] | None:
    import sympy

    out = []
    for v in values if isinstance(values, list) else [values]:
        if isinstance(v, int | np.integer | sympy.Integer):
            out.append(int(v))
        else:
            return None
    return out


def fold_shapes(source: str | Path, target: str | Path) -> Counter:
    """Write ``source`` with its known shape values folded to ``target``; returns what changed.
    Raises whatever ONNX Runtime's shape inference raises (the caller keeps ``source`` then)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(source))
    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
    inference._preprocess(model)
    while inference.run_:
        inference._infer_impl()
    inference._update_output_from_vi()
    graph = inference.out_mp_.graph
    infos = {v.name: v for v in [*graph.value_info, *graph.output, *graph.input]}
    data = inference.sympy_data_
    initializers = {i.name for i in model.graph.initializer}

    def constant(name: str, array: np.ndarray) -> Any:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))

    changed: Counter = Counter()
    nodes = []
    for node in model.graph.node:
        out = node.output[0] if len(node.output) == 1 else None
        if node.op_type in _SHAPE_OPS and out in data and out in infos:
            known = _known(data[out])
            if known is not None:
                elem = helper.tensor_dtype_to_np_dtype(infos[out].type.tensor_type.elem_type)
                array = np.array(known if isinstance(data[out], list) else known[0], dtype=elem)
                nodes.append(constant(out, array))
                changed[node.op_type] += 1
                continue
        if node.op_type in ("Reshape", "Expand") and node.input[1] not in initializers:
            shape = _new_shape(node, infos)
            if shape is not None:
                name = f"{node.output[0]}/folded_shape"
                nodes.append(constant(name, np.array(shape, dtype=np.int64)))
                node.input[1] = name
                changed[f"{node.op_type} shape"] += 1
        nodes.append(node)
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(nodes):  # nodes are topologically sorted: drop what nothing reads
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    changed["removed"] = len(nodes) - len(kept)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    live = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)
    onnx.save(model, str(target))
    return changed


def _new_shape(node: Any, infos: dict[str, Any]) -> list[int] | None:
    """A constant shape input for a Reshape or Expand whose output has at most one unknown
    dimension (Reshape: ``-1``; Expand: a dimension the input already has is ``1``)."""
    if node.output[0] not in infos:
        return None
    out = _dims(infos[node.output[0]])
    if node.op_type == "Reshape":
        if any(d is None or d == 0 for d in out) or sum(isinstance(d, str) for d in out) > 1:
            return None
        return [-1 if isinstance(d, str) else int(d) for d in out]
    if node.input[0] not in infos:
        return None
    source = _dims(infos[node.input[0]])
    if len(source) != len(out):
        return None
    shape = []
    for have, want in zip(source, out, strict=True):
        if have == want and have is not None:
            shape.append(1)
        elif isinstance(want, int) and want > 0:
            shape.append(want)
        else:
            return None
    return shape


__all__ = ["fold_shapes"]
