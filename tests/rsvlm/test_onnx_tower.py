"""The detector's tower levels through ONNX Runtime: the same levels as PyTorch's, one graph per
prepared read size kept in the cache, and PyTorch again for a size not prepared or that cannot
run."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from rsvlm.perception import DetectorConfig, Perception, save_detector

pytest.importorskip("onnxruntime")


def _perception(tmp_path: Path) -> Perception:
    from rsvlm.testing import tiny_image_processor, tiny_model

    model = tiny_model()
    cfg = DetectorConfig(labels=["building"], input_size=56, layers=[1, 2], hidden=32, dim=8,
                         convs=1, threshold=0.3, zoom_input_size=None)
    save_detector(cfg.build(), cfg, tmp_path / "parts")
    return Perception.load(tmp_path / "parts", model.vision_tower.model, tiny_image_processor())


def test_the_onnx_tower_reads_the_levels_pytorch_reads(tmp_path: Path) -> None:
    perception = _perception(tmp_path)
    images = [Image.new("RGB", (80, 80), (120 + 30 * i, 110, 90)) for i in range(3)]
    torch_levels = perception.features(images)
    torch_small = perception.features(images[:1], 28)
    torch_dets = perception.detect(images[0], gsd=0.15)
    assert perception.use_onnx(cache_dir=tmp_path / "cache")
    onnx_levels = perception.features(images)  # batch of 3: the graph was traced with 2
    assert set(perception.onnx.sessions) == {56}
    for a, b in zip(torch_levels, onnx_levels, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Another size is read by PyTorch until a graph of it is prepared: no export waits on a
    # chip, and the open graphs stay the ones asked for.
    small = perception.features(images[:1], 28)
    assert set(perception.onnx.sessions) == {56}
    torch.testing.assert_close(torch_small[0], small[0])
    perception.onnx.prepare([28])
    small = perception.features(images[:1], 28)
    torch.testing.assert_close(torch_small[0], small[0], atol=1e-4, rtol=1e-4)
    assert set(perception.onnx.sessions) == {56, 28}
    dets = perception.detect(images[0], gsd=0.15)
    assert [d.box for d in dets] == pytest.approx([d.box for d in torch_dets], abs=1e-4)
    # A second reader of the same weights finds both graphs in the cache.
    graphs = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(graphs) == 2
    again = _perception(tmp_path / "again")
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*/tower.onnx")}
    assert again.use_onnx(cache_dir=tmp_path / "cache")
    again.features(images[:1])
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    # An engine opens the sizes every read takes before the first chip.
    third = _perception(tmp_path / "third")
    third.use_onnx(cache_dir=tmp_path / "cache")
    third.onnx.prepare([56, 28])
    assert set(third.onnx.sessions) == {56, 28}


def test_a_size_that_cannot_run_is_read_by_pytorch(tmp_path: Path, monkeypatch) -> None:
    from rsvlm import onnx_tower

    perception = _perception(tmp_path)
    image = Image.new("RGB", (64, 64), (100, 140, 90))
    expected = perception.features(image)

    def broken(*args, **kwargs):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(onnx_tower.torch.onnx, "export", broken)
    perception.use_onnx(cache_dir=tmp_path / "cache")
    got = perception.features(image)
    assert perception.onnx.failed == {56} and not perception.onnx.sessions
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b)


def test_the_int8_tower_reads_levels_that_point_where_pytorch_s_do(tmp_path: Path) -> None:
    perception = _perception(tmp_path)
    images = [Image.new("RGB", (80, 80), (120 + 30 * i, 110 - 20 * i, 90)) for i in range(2)]
    expected = perception.features(images)
    assert perception.use_onnx(cache_dir=tmp_path / "cache", quantize="int8")
    assert perception.onnx.quantize == "int8" and set(perception.onnx.sessions) == {56}
    got = perception.features(images)
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape
        assert float(torch.nn.functional.cosine_similarity(a.detach(), b, dim=-1).mean()) > 0.98
        assert not torch.equal(a, b)  # int8 weights: close, not the float32 graph again
    # Its own graph in the cache, beside (not instead of) the float32 one.
    fp32 = _perception(tmp_path / "fp32")
    assert fp32.use_onnx(cache_dir=tmp_path / "cache")
    metas = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/tower.json")]
    assert sorted(str(m.get("quantize")) for m in metas) == ["None", "int8"]
    assert all(m["mean_cosine"] > 0.98 for m in metas if m.get("quantize"))


def test_an_int8_graph_that_fails_its_check_is_read_in_float32(tmp_path: Path,
                                                               monkeypatch) -> None:
    from rsvlm import onnx_tower

    perception = _perception(tmp_path)
    image = Image.new("RGB", (64, 64), (100, 140, 90))
    expected = perception.features(image)
    monkeypatch.setattr(onnx_tower, "MIN_COSINE", 1.01)  # no int8 graph can pass
    assert perception.use_onnx(cache_dir=tmp_path / "cache", quantize="int8")
    assert perception.onnx.quantize is None and set(perception.onnx.sessions) == {56}
    for a, b in zip(expected, perception.features(image), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_who_reads_the_detector_tower(monkeypatch) -> None:
    from rsvlm.engine import DETECTOR_TOWER, detector_tower_for

    monkeypatch.delenv("RSVLM_DETECTOR_TOWER", raising=False)
    assert detector_tower_for("auto", "onnx") == DETECTOR_TOWER
    assert detector_tower_for(None, "torch") == "torch"  # no ONNX Runtime decode: none here
    assert detector_tower_for("onnx-int8", "torch") == "onnx-int8"
    monkeypatch.setenv("RSVLM_DETECTOR_TOWER", "torch")
    assert detector_tower_for("auto", "onnx") == "torch"
    with pytest.raises(ValueError, match="detector tower"):
        detector_tower_for("int4", "onnx")
