"""scripts/bench_gpu.py on tiny shapes on the CPU, so the GPU benchmark cannot rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_tiny_runs_and_reports_every_number(tmp_path: Path) -> None:
    bench = _load()
    printed: list[str] = []
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    result = bench.main(
        [
            "--tiny",
            "--batches",
            "1,2",
            "--scene-size",
            "300",
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
        ],
        out=printed.append,
    )
    assert json.loads(out_json.read_text()) == result
    env, rows = result["env"], result["rows"]
    assert env["device"] == "cpu" and env["bandwidth_gbs"] > 0
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"nf4", "bf16"}
    nf4, bf16 = by_mode["nf4"], by_mode["bf16"]
    assert nf4["nf4_linears"] > 0 and bf16["nf4_linears"] == 0
    assert nf4["weights_bytes"] < bf16["weights_bytes"]  # 4-bit decoder linears are smaller
    for row in rows:
        assert row["first_token_s"] > 0 and row["prompt_tokens"] > env["image_tokens"]
        assert row["decode_tok_s_b1"] > 0 and row["decode_tok_s_b2"] > 0
        # one decode step reads at least the decoder's weights; the rate is below the bound
        assert row["bytes_per_step_b1"] > row["bytes_per_step_b2"] / 2 > 0
        assert 0 < row["bw_fraction_b1"] < 1
    scene = nf4["scene"]
    assert scene["chips_done"] == scene["chips_total"] == 9 and scene["chips_per_s"] > 0
    assert "scene" not in bf16  # the scan runs for --scene-modes only (nf4 by default)
    assert "| nf4 |" in printed[0] and out_md.read_text() == printed[0]


def test_real_shapes_match_the_public_configs() -> None:
    bench = _load()
    config = bench.bench_config(tiny=False)  # config only: nothing is built or downloaded
    tc, vc = config.text_config, config.vision_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads) == (3584, 28, 28)
    assert (tc.num_key_value_heads, tc.intermediate_size, tc.vocab_size) == (4, 18944, 152064)
    assert (vc.hidden_size, vc.num_hidden_layers, vc.intermediate_size) == (1152, 27, 4304)
    assert (vc.image_size, vc.patch_size) == (384, 14)
    assert bench.decode_bytes_per_step.__doc__  # the bound is documented where it is computed


def test_bench_gpu_tiny_pretrained_backends(tmp_path: Path) -> None:
    bench = _load()
    printed: list[str] = []
    result = bench.main(["--tiny", "--only-backends", "--backends", "qwen2_5_vl,florence2",
                         "--batches", "1", "--scene-size", "300"], out=printed.append)
    assert result["rows"] == []
    rows = {(r["backend"], r["mode"]): r for r in result["backend_rows"]}
    assert set(rows) == {(f, m) for f in ("qwen2_5_vl", "florence2") for m in ("nf4", "bf16")}
    for (_family, mode), row in rows.items():
        assert row["first_token_s"] > 0 and row["decode_tok_s_b1"] > 0
        assert (row["nf4_linears"] > 0) == (mode == "nf4")
    assert rows[("qwen2_5_vl", "nf4")]["scene"]["chips_done"] == 9
    assert "| tiny qwen2_5_vl | nf4 |" in printed[0]


def test_backend_real_shapes_have_the_published_sizes(tmp_path: Path) -> None:
    import importlib.util

    import torch

    from rsvlm.backends import family_for
    from rsvlm.backends.tiny import write_tiny_checkpoint

    path = SCRIPT.with_name("bench_backends.py")
    spec = importlib.util.spec_from_file_location("bench_backends", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # parameters of the hub checkpoints: 8.29 B, 8.77 B, 0.77 B (model cards / safetensors index)
    for family, billions in (("qwen2_5_vl", 8.29), ("qwen3_vl", 8.77), ("florence2", 0.77)):
        config = module.real_config(family, write_tiny_checkpoint(family, tmp_path / family))
        with torch.device("meta"):
            model = family_for(family).transformers_class()(config)
        assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - billions) < 0.01, family
