"""The app's handlers over each pretrained family (tiny random checkpoints in their hub layout):
the region's OSM tags reach the prompt, answers and semantics flow as with the embedded model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "florence2", "llava"])
def test_app_backend_and_handlers_with_a_tiny_checkpoint(demo_region, tmp_path, family) -> None:
    from app import handlers as h
    from app.backend import EngineBackend
    from app.handlers import AppContext
    from rsvlm.backends.semantics import osm_context
    from rsvlm.backends.tiny import write_tiny_checkpoint
    from rsvlm.loading import load

    loaded = load(str(write_tiny_checkpoint(family, tmp_path / "tiny")), device="cpu")
    backend = EngineBackend(loaded, osm=osm_context(demo_region.osm))
    # The whole 1536 x 1024 px region is larger than 1.5 chips of 768 px: "find all" scans it in
    # 6 tiles through this family's sessions (the app's scan works with any backend). Qwen-VL
    # reads every tile at full resolution (about 35 s for 6 tiles here): one look for those.
    scan = family in ("florence2", "llava")
    ctx = AppContext(backend=backend, region=demo_region, export_dir=tmp_path, chip_size=768,
                     scan_large_areas=scan)
    state, _ = h.start_session(ctx)
    updates = list(h.ask(ctx, state, "Find all buildings"))
    assert updates and updates[-1].prompt and state.last_answer is not None
    said = updates[-1].chat[-1]["content"]
    assert ("reading the whole area in 6 tiles" in said) == scan, said
    if family != "florence2":  # Florence-2's task prompts carry no context
        assert "OSM building" in updates[-1].prompt
    assert backend.info["family"] == family and backend.info["state"] == "ready"
