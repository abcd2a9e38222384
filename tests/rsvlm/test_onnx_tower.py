"""The detector's tower levels through ONNX Runtime: the same levels as PyTorch's, one graph per
prepared read size kept in the cache, and PyTorch again for a size not prepared or that cannot
run."""

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
