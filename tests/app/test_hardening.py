"""Login throttle and credential sources, the session file lifecycle, coverage rules, messages
without server paths, telemetry off and no network probe by default."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import auth, guards
from app import handlers as h
from app.files import EXPORT_TOKEN_BYTES, FileStore
from app.handlers import AppContext

DRAWN = (32.5942, 0.3505, 32.5952, 0.3512)


# --- login ----------------------------------------------------------------------------------------

def test_failed_logins_wait_longer_each_time_and_the_right_one_resets() -> None:
    check = auth.throttled_auth({"alice": "s3cret"}, base_delay_s=0.05, max_delay_s=0.4)
    assert asyncio.iscoroutinefunction(check)  # Gradio awaits only coroutine functions

    async def timed(user: str, password: str) -> tuple[bool, float]:
        t0 = time.perf_counter()
        ok = await check(user, password)
        return ok, time.perf_counter() - t0

    async def scenario() -> list[tuple[bool, float]]:
        return [await timed("alice", "wrong") for _ in range(5)] + [
            await timed("alice", "s3cret"), await timed("alice", "s3cret")]

    results = asyncio.run(scenario())
    waits = [t for _, t in results]
    assert [ok for ok, _ in results] == [False] * 5 + [True, True]
    assert waits[0] < 0.04  # the first attempt is not delayed
    for before, after in zip(waits[1:4], waits[2:5], strict=True):
        assert after > before * 1.6  # doubling
    assert waits[4] < 0.6  # capped at max_delay_s
    assert waits[5] > 0.3  # the right password waits too (no free oracle)...
    assert waits[6] < 0.04  # ...and resets the counter


def test_unknown_users_share_one_counter_and_parallel_guesses_queue() -> None:
    check = auth.throttled_auth({"alice": "s3cret"}, base_delay_s=0.1, max_delay_s=1.0)

    async def scenario() -> float:
        await check("bob", "x")
        await check("carol", "x")  # a different unknown name: same counter, now 1 failure
        t0 = time.perf_counter()
        results = await asyncio.gather(*(check(f"u{i}", "x") for i in range(3)))
        assert results == [False] * 3
        return time.perf_counter() - t0

    # Checked one at a time with delays 0.2 + 0.4 + 0.8: parallelism does not skip the wait.
    assert asyncio.run(scenario()) > 1.2


def test_waiting_logins_are_bounded() -> None:
    check = auth.throttled_auth({"alice": "s3cret"}, base_delay_s=0.5, max_waiting=2)

    async def scenario() -> tuple[list[bool], float]:
        await check("alice", "wrong")
        t0 = time.perf_counter()
        results = await asyncio.gather(*(check("alice", "s3cret") for _ in range(4)))
        return results, time.perf_counter() - t0

    results, took = asyncio.run(scenario())
    assert results.count(True) == 2 and results.count(False) == 2  # two refused unchecked
    assert took < 2.0


def test_credentials_come_from_a_file_or_the_environment(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    f = tmp_path / "auth.txt"
    f.write_text("# users\nalice:pa:ss word\n\nbob:x\n")
    f.chmod(0o600)
    assert auth.load_credentials(str(f), None, environ={}) == {"alice": "pa:ss word",
                                                               "bob": "x"}
    assert auth.load_credentials(None, None, environ={auth.ENV_VAR: "carol:y"}) == {"carol": "y"}
    assert auth.load_credentials(None, None, environ={}) is None
    with caplog.at_level(logging.WARNING, logger="app.auth"):
        assert auth.load_credentials(None, "dave:z", environ={}) == {"dave": "z"}
    assert "ps" in caplog.text  # --auth still works, with a warning
    f.write_text("no colon here\n")
    with pytest.raises(SystemExit, match="line 1"):
        auth.load_credentials(str(f), None, environ={})
    with pytest.raises(SystemExit, match="cannot read"):
        auth.load_credentials(str(tmp_path / "missing"), None, environ={})


# --- files ------------------------------------------------------------------------------------------

def test_exports_live_in_the_session_folder_with_128_random_bits(ctx: AppContext) -> None:
    state, _ = h.start_session(ctx, key="session-1")
    for _ in h.ask(ctx, state, "Find all buildings"):
        pass
    path, _ = h.export(ctx, state)
    token = path.stem.split("-", 1)[1]
    assert len(token) >= 22 and EXPORT_TOKEN_BYTES * 8 >= 128  # urlsafe base64 of 16 bytes
    assert path.parent == state.files.folder and path.parent.parent == ctx.files.root
    assert oct(ctx.files.root.stat().st_mode & 0o777) == "0o700"
    ctx.files.close("session-1")  # the tab went away (demo.unload)
    assert not path.exists() and not state.files.folder.exists()


def test_one_upload_shared_by_two_calls_lives_until_both_are_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.files import LEASES

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    monkeypatch.setattr(LEASES, "GRACE_S", 0.05)
    shared = tmp_path / "hash" / "same.png"
    shared.parent.mkdir()
    shared.write_bytes(b"x")
    with LEASES.lease(shared):
        with LEASES.lease(shared):
            pass
        time.sleep(0.3)
        assert shared.exists()  # the first call is done, the second still reads it
    deadline = time.time() + 5
    while shared.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert not shared.exists() and not shared.parent.exists()


def test_state_expiry_removes_the_files_and_old_folders_go_at_start_up(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "files")
    files = store.open()
    export = files.export_path("detections", ".geojson")
    export.write_text("{}")
    state = h.SessionState(files=files)
    state.close()  # gr.State(delete_callback=...) on expiry
    assert not export.exists()
    old, new = store.open().folder, store.open().folder
    other = store.root / "not-ours"
    for folder in (old, new, other):
        folder.mkdir()
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    os.utime(other, (time.time() - 7 * 3600,) * 2)
    assert store.sweep(6 * 3600) == 1
    assert not old.exists() and new.exists() and other.exists()
    shared = tmp_path / "shared"  # an existing folder given as --files-dir keeps its mode
    shared.mkdir(mode=0o755)
    FileStore(shared)
    assert oct(shared.stat().st_mode & 0o777) == "0o755"


def test_uploads_move_out_of_gradios_folder_only(ctx: AppContext, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gradio_tmp = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(gradio_tmp))
    upload = gradio_tmp / "abc123" / "photo.png"
    upload.parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), (1, 2, 3)).save(upload)
    from app.files import LEASES

    monkeypatch.setattr(LEASES, "GRACE_S", 0.05)
    state, _ = h.start_session(ctx)
    h.upload(ctx, state, str(upload))
    assert Path(state.upload_path).is_relative_to(state.files.folder)
    deadline = time.time() + 5
    while upload.parent.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert not upload.exists() and not upload.parent.exists()  # Gradio's copy and hash folder
    elsewhere = tmp_path / "mine.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(elsewhere)
    h.upload(ctx, state, str(elsewhere))
    assert elsewhere.exists()  # a caller's own file is read where it is


# --- coverage and input guards --------------------------------------------------------------------

def test_bbox_holding_the_imagery_is_clipped_and_a_sliver_is_refused(ctx: AppContext) -> None:
    state, _ = h.start_session(ctx)
    update = h.select_bbox(ctx, state, (30.0, -2.0, 35.0, 3.0))
    assert update.notice is None
    assert np.allclose(state.chip.bounds_lonlat, ctx.region.bounds_lonlat, atol=1e-5)
    assert state.chip.meta["coverage"] > 0.99
    w, s, e, n = ctx.region.bounds_lonlat
    sliver = (e - (e - w) * 0.05, n - (n - s) * 0.05, e + (e - w), n + (n - s))
    update = h.select_bbox(ctx, state, sliver)
    assert "covers only" in update.notice and f"{w:.6f}" in update.notice


def test_partial_coverage_is_said_in_the_answer(ctx: AppContext) -> None:
    state, _ = h.start_session(ctx)
    w, s, e, n = ctx.region.bounds_lonlat
    h.select_bbox(ctx, state, (w - (e - w) * 0.5, s + (n - s) * 0.1, e, n))  # a third empty
    cover = state.chip.meta["coverage"]
    assert 0.5 < cover < 0.8
    final = list(h.ask(ctx, state, "Describe this image."))[-1]
    assert f"imagery covers {cover:.0%}".replace("%", "\\%") in final.chat[-1]["content"]


def test_nodata_only_and_no_georeference(ctx: AppContext, tmp_path: Path) -> None:
    import rasterio
    from rasterio.transform import from_origin

    nan = tmp_path / "nan.tif"
    with rasterio.open(nan, "w", driver="GTiff", width=16, height=16, count=1,
                       dtype="float32", crs="EPSG:3857",
                       transform=from_origin(3628312.86, 39135.76, 1, 1)) as ds:
        ds.write(np.full((1, 16, 16), np.nan, np.float32))
    with pytest.raises(h.UserError, match="no valid pixels"):
        h.api_ask(ctx, str(nan), "", "What is this?")
    png = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(png)
    with pytest.raises(h.UserError, match="no georeference"):
        h.api_ask(ctx, str(png), ",".join(map(str, DRAWN)), "What is this?")


def test_long_question_is_refused_with_the_limit(ctx: AppContext) -> None:
    with pytest.raises(h.UserError, match="200,000 characters long; the limit is 2,000"):
        h.api_ask(ctx, None, "", "x" * 200_000)
    state, _ = h.start_session(ctx)
    update = list(h.ask(ctx, state, "x" * 2001))[-1]
    assert "limit is 2,000" in update.notice and not state.history


def test_messages_carry_no_server_path(ctx: AppContext, tmp_path: Path) -> None:
    fake = tmp_path / "deep" / "server" / "folder" / "notes.tif"
    fake.parent.mkdir(parents=True)
    fake.write_text("not an image")
    with pytest.raises(h.UserError) as err:
        h.api_ask(ctx, str(fake), "", "What is this?")
    assert "notes.tif" in str(err.value) and str(fake.parent) not in str(err.value)
    state, _ = h.start_session(ctx)
    notice = h.upload(ctx, state, str(fake)).notice
    assert "notes.tif" in notice and str(tmp_path) not in notice
    assert guards.public("'/srv/a/b.tif' bad; see http://x/y") == "'b.tif' bad; see http://x/y"


def test_a_rejection_is_one_log_line(ctx: AppContext, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.rejected"), pytest.raises(h.UserError):
        h.api_ask(ctx, None, "", "y" * 50_000)
    state, _ = h.start_session(ctx)
    with caplog.at_level(logging.INFO, logger="app.rejected"):
        h.select_bbox(ctx, state, (0.0, 0.0, 1.0, 1.0))
    # api_ask raises and the Gradio wrapper logs; select_bbox logs itself.
    records = [r for r in caplog.records if r.name == "app.rejected"]
    assert records and all(r.exc_info is None and len(r.getMessage()) < 260 for r in records)


# --- telemetry and network ------------------------------------------------------------------------

def test_telemetry_is_off_in_the_built_page(ctx: AppContext) -> None:
    assert os.environ.get("GRADIO_ANALYTICS_ENABLED") == "False"  # set by `import app`
    from app.layout import build_demo

    demo = build_demo(ctx)
    assert demo.analytics_enabled is False
    assert demo.get_config_file()["analytics_enabled"] is False


def test_no_network_probe_unless_basemaps_are_asked_for(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    from app import main
    from app.backend import FakeBackend

    calls: list[str] = []
    monkeypatch.setattr(main, "network_reachable", lambda *a, **k: calls.append("probe") or True)
    args = main.parse_args(["--fake-model", "--files-dir", str(tmp_path / "f")])
    assert main.build_context(args, FakeBackend()).online is False and calls == []
    args = main.parse_args(["--fake-model", "--basemaps", "--files-dir", str(tmp_path / "f")])
    assert main.build_context(args, FakeBackend()).online is True and calls == ["probe"]


def test_dockerfile_turns_telemetry_off() -> None:
    text = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    assert "GRADIO_ANALYTICS_ENABLED=False" in text and "HF_HUB_DISABLE_TELEMETRY=1" in text


def test_api_geojson_has_the_chip_summary(ctx: AppContext) -> None:
    _, geojson = h.api_ask(ctx, None, ",".join(map(str, DRAWN)), "Find all buildings")
    chip = json.loads(geojson)["chip"]
    assert chip["coverage"] == 1.0 and len(chip["bounds_lonlat"]) == 4


def test_registered_files_are_served_to_their_browser_only() -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from app.serving import COOKIE, FileOwners, OwnedFiles

    owners = FileOwners()
    inner = Starlette(routes=[Route("/gradio_api/file={path:path}",
                                    lambda request: PlainTextResponse("data"))])
    app = OwnedFiles(inner, owners)
    alice, bob = TestClient(app), TestClient(app)
    assert alice.get("/gradio_api/file=/tmp/gradio/x/free.txt").text == "data"  # unregistered
    token = alice.cookies.get(COOKIE)
    assert token and len(token) >= 32 and bob.get("/").status_code == 404  # bob gets his own
    assert bob.cookies.get(COOKIE) not in (None, token)
    owners.register("/tmp/gradio/abc/detections-x.geojson", token)
    url = "/gradio_api/file=/tmp/gradio/abc/detections-x.geojson"
    assert alice.get(url).status_code == 200
    assert bob.get(url).status_code == 404
    assert TestClient(app).get(url).status_code == 404  # no cookie yet: nothing
    owners.forget("/tmp/gradio/abc/detections-x.geojson")
    assert bob.get(url).status_code == 200  # forgotten (session over): Gradio decides again
