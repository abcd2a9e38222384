"""The app's handlers over a pretrained family (a tiny random Qwen2.5-VL in its hub layout):
the region's OSM tags reach the prompt, boxes and semantics flow as with the embedded model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_app_backend_and_handlers_with_a_tiny_checkpoint(demo_region, tmp_path) -> None:
    from app import handlers as h
    from app.backend import EngineBackend
    from app.handlers import AppContext
    from rsvlm.backends.semantics import osm_context
    from rsvlm.backends.tiny import write_tiny_checkpoint
    from rsvlm.loading import load

    loaded = load(str(write_tiny_checkpoint("qwen2_5_vl", tmp_path / "tiny")), device="cpu")
    backend = EngineBackend(loaded, osm=osm_context(demo_region.osm))
    ctx = AppContext(backend=backend, region=demo_region, export_dir=tmp_path)
    state, _ = h.start_session(ctx)
    updates = list(h.ask(ctx, state, "Find all buildings"))
    assert updates and "OSM building" in updates[-1].prompt
    assert backend.info["family"] == "qwen2_5_vl" and backend.info["state"] == "ready"
