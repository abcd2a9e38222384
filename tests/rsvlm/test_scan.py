"""Whole-scene scan: grid, cross-border merging in map coordinates, progress, cancel, tiny model."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box as shapely_box

import tiles
from rsvlm.scan import ScanError, scan
from tiles.geometry import transform_geometry

UTM = "EPSG:32636"  # 1 m pixels near Kampala
X0, Y0 = 455_000.0, 40_000.0  # top-left corner
W, H = 1000, 600


def _write_raster(path: Path, crs: str = UTM, width: int = W, height: int = H) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    if crs == "EPSG:4326":  # ~1 m pixels in degrees at the equator
        transform = from_origin(32.5, 0.35, 1e-5, 1e-5)
    else:
        transform = from_origin(X0, Y0, 1.0, 1.0)
    data = np.random.default_rng(0).integers(0, 255, (3, height, width), dtype=np.uint8)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=3,
        dtype="uint8",
        crs=crs,
        transform=transform,
    ) as ds:
        ds.write(data)
    return path


def _truth_answer_fn(objects: dict[str, tuple[float, float, float, float]], crs: str = UTM):
    """Answers like a perfect detector: every object's part inside the chip, in the box grammar."""
    calls: list[int] = []

    def answer(chips, question):
        calls.append(len(chips))
        texts = []
        for chip in chips:
            parts = []
            for label, (minx, miny, maxx, maxy) in objects.items():
                geom = transform_geometry(shapely_box(minx, miny, maxx, maxy), crs, chip.crs)
                px = chip.geometry_to_pixels(geom, crs=chip.crs)
                x1, y1, x2, y2 = px.bounds
                x1, y1 = max(0.0, x1), max(0.0, y1)
                x2, y2 = min(chip.width, x2), min(chip.height, y2)
                if x2 - x1 < 1 or y2 - y1 < 1:
                    continue
                n = [round(v) for v in chip.px_to_norm((x1, y1, x2, y2))]
                parts.append(
                    f"<ref>{label.split('#')[0]}</ref><box>[{n[0]},{n[1]},{n[2]},{n[3]}]</box>"
                )
            texts.append(" ".join(parts) or "nothing here")
        return texts

    answer.calls = calls
    return answer


def _utm_bounds(det) -> tuple[float, ...]:
    return transform_geometry(det.geometry, "EPSG:4326", UTM).bounds


def test_objects_across_chip_borders_are_reported_once(tmp_path: Path) -> None:
    # chips of 256 px, step 224: chip columns start at x = 0, 224, 448, 672, 744.
    objects = {
        "building#a": (X0 + 240, Y0 - 100, X0 + 270, Y0 - 80),  # inside the 224-256 overlap
        "building#b": (X0 + 250, Y0 - 150, X0 + 290, Y0 - 120),  # cut by chip 0's right border
        "field#c": (X0 + 100, Y0 - 220, X0 + 400, Y0 - 180),  # wider than the overlap: 2 chips
        "building#d": (X0 + 100, Y0 - 60, X0 + 120, Y0 - 40),  # one chip only
    }
    answer = _truth_answer_fn(objects)
    done: list[tuple[int, int]] = []
    with tiles.open_source(_write_raster(tmp_path / "scene.tif")) as source:
        result = scan(
            source,
            "find all buildings",
            answer_fn=answer,
            chip_size=256,
            batch_size=3,
            progress=lambda d, t: done.append((d, t)),
        )
    assert result.chips_total == result.chips_done == 5 * 3
    assert done[-1] == (15, 15) and len(done) == 5 and max(answer.calls) == 3
    assert result.raw_boxes > len(objects)  # chips saw the objects several times...
    assert len(result) == len(objects)  # ...and each is reported once
    for det in result:
        match = [k for k, b in objects.items() if np.allclose(_utm_bounds(det), b, atol=1.5)]
        assert len(match) == 1, (det.label, _utm_bounds(det))
        assert det.label == match[0].split("#")[0] and det.score == 1.0
        assert det.question == "find all buildings"


def test_cut_box_without_a_confirming_neighbour_is_down_weighted(tmp_path: Path) -> None:
    objects = {"building": (X0 + 230, Y0 - 100, X0 + 260, Y0 - 80)}
    full = _truth_answer_fn(objects)

    def only_left_chip(chips, question):  # the right-hand neighbour misses the object
        return [
            t if chip.bounds[0] < X0 + 10 else ""
            for chip, t in zip(chips, full(chips, question), strict=True)
        ]

    with tiles.open_source(_write_raster(tmp_path / "s.tif", width=480, height=256)) as source:
        result = scan(source, "find all buildings", answer_fn=only_left_chip, chip_size=256)
    assert len(result) == 1 and result[0].score == 0.5  # truncated at x = 256 and unconfirmed
    assert _utm_bounds(result[0])[2] == pytest.approx(X0 + 256, abs=1.5)


def test_geographic_raster_merges_in_utm(tmp_path: Path) -> None:
    # An object straddling two chips of a raster in degrees: merged in UTM, exported in lon/lat.
    obj = {"ship": (32.5 + 230e-5, 0.35 - 100e-5, 32.5 + 300e-5, 0.35 - 80e-5)}
    with tiles.open_source(_write_raster(tmp_path / "g.tif", "EPSG:4326", 480, 256)) as source:
        result = scan(
            source, "find ships", answer_fn=_truth_answer_fn(obj, "EPSG:4326"), chip_size=256
        )
    assert result.metric_crs == "EPSG:32636"
    assert len(result) == 1
    assert np.allclose(result[0].geometry.bounds, obj["ship"], atol=2e-5)


def test_cancel_stops_between_batches_and_keeps_partial_results(tmp_path: Path) -> None:
    cancel = threading.Event()
    answer = _truth_answer_fn({"building": (X0 + 10, Y0 - 30, X0 + 40, Y0 - 10)})

    def progress(done: int, total: int) -> None:
        if done >= 2:
            cancel.set()

    with tiles.open_source(_write_raster(tmp_path / "c.tif")) as source:
        result = scan(
            source,
            "find all buildings",
            answer_fn=answer,
            chip_size=256,
            batch_size=2,
            progress=progress,
            cancel=cancel,
        )
    assert result.cancelled and result.chips_done == 2 < result.chips_total
    assert len(result) == 1  # the object in the first chip is kept


def test_bad_input_gets_one_clear_error(tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "photo.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png)
    answer = _truth_answer_fn({})
    with tiles.open_source(png) as source, pytest.raises(ScanError, match="georeference"):
        scan(source, "find all buildings", answer_fn=answer)
    with tiles.open_source(_write_raster(tmp_path / "r.tif")) as source:
        with pytest.raises(ScanError, match="look for"):
            scan(source, "  ", answer_fn=answer)
        with pytest.raises(ScanError, match="exactly one"):
            scan(source, "find cars")
        with pytest.raises(ScanError, match="batch size"):
            scan(source, "find cars", answer_fn=answer, batch_size=0)


@pytest.fixture(scope="module")
def tiny_engine():
    from rsvlm.engine import ChatEngine
    from rsvlm.testing import TINY_IMAGE_TOKEN_ID, tiny_model, tiny_processor

    class Loaded:
        model = tiny_model(connector_type="semantic_prompter", image_token_id=TINY_IMAGE_TOKEN_ID)
        processor = tiny_processor(model.config)
        database = None
        info = {"preset": "tiny"}

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread beats fighting over shared cores
    yield ChatEngine(Loaded(), max_new_tokens=5, generation={"repetition_penalty": 1.0})
    torch.set_num_threads(threads)


def test_tiny_model_batched_answers_match_one_at_a_time(tmp_path: Path, tiny_engine) -> None:
    from rsvlm.scan import engine_answer_fn

    engine = tiny_engine
    answer = engine_answer_fn(engine, max_new_tokens=5)
    with tiles.open_source(_write_raster(tmp_path / "t.tif", width=300, height=200)) as source:
        chips = [
            source.chip((X0 + x, Y0 - 200, X0 + x + 100, Y0 - 100), crs=UTM, size=64)
            for x in (0, 100, 200)
        ]
        batched = answer(chips, "how many buildings are there ?")
        single = [answer([c], "how many buildings are there ?")[0] for c in chips]
        assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
        assert batched == single  # left padding does not change greedy answers
        # The same chip through the chat engine gives the same answer.
        session = engine.session(chips[0])
        list(session.ask("how many buildings are there ?", max_new_tokens=5))
        assert session.last.text == single[0]
        result = scan(
            source,
            "find all buildings",
            engine=engine,
            chip_size=128,
            batch_size=4,
            max_new_tokens=5,
        )
    assert result.chips_done == result.chips_total == 6
    assert all(d.geometry.is_valid for d in result)


def test_cli_scan_writes_geojson(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_engine
) -> None:
    import json

    import rsvlm.loading
    from rsvlm import cli

    engine = tiny_engine

    class Loaded:
        model, processor, database = engine.model, engine.processor, None
        info = {"preset": "tiny", "summary": "tiny"}

    monkeypatch.setattr(rsvlm.loading, "load", lambda *a, **k: Loaded())
    raster = _write_raster(tmp_path / "cli.tif", width=300, height=200)
    out = tmp_path / "det.geojson"
    code = cli.main(
        [
            "scan",
            str(raster),
            "find all buildings",
            "--out",
            str(out),
            "--chip-size",
            "128",
            "--batch-size",
            "3",
            "--max-new-tokens",
            "4",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert data["type"] == "FeatureCollection" and isinstance(data["features"], list)
    assert cli.main(["scan", str(tmp_path / "missing.tif"), "find x", "--out", str(out)]) == 2


def test_gpu_out_of_memory_in_a_batch_says_to_lower_the_batch_size(
    tmp_path: Path, tiny_engine
) -> None:
    import torch

    from rsvlm.scan import engine_answer_fn

    class OOMModel:
        dtype = torch.float32

        def __getattr__(self, name):
            return getattr(tiny_engine.model, name)

        def generate(self, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    class Engine:
        processor, generation, use_retrieval = tiny_engine.processor, {}, False
        generate_kwargs = staticmethod(lambda prompt_length: {})
        model, device, generation_lock = OOMModel(), torch.device("cpu"), threading.Lock()

    answer = engine_answer_fn(Engine())
    raster = _write_raster(tmp_path / "o.tif", width=128, height=128)
    with tiles.open_source(raster) as source, pytest.raises(ScanError, match="smaller --batch"):
        scan(source, "find all cars", answer_fn=answer, chip_size=64)
