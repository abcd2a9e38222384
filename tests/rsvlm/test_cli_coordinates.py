"""`rsvlm ask --bbox -122.5,37.7,-122.4,37.8`: negative coordinates as users write them."""

from __future__ import annotations

import argparse

import pytest

from rsvlm import cli


def test_ask_takes_negative_bbox_and_region_box(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, argparse.Namespace] = {}
    monkeypatch.setattr(cli, "_ask", lambda args: seen.setdefault("args", args) and 0)
    code = cli.main(["ask", "scene.tif", "how many buildings?", "--bbox",
                     "-122.5,37.7,-122.4,37.8", "--region-box", "-0.5,2,30,40"])
    assert code == 0
    assert seen["args"].bbox == (-122.5, 37.7, -122.4, 37.8)
    assert seen["args"].region_box == (-0.5, 2.0, 30.0, 40.0)
    assert seen["args"].question == "how many buildings?"


def test_ask_with_negative_bbox_reaches_the_imagery(tmp_path, capsys) -> None:
    """End to end up to the image: a western bbox on a picture without a CRS is refused for
    the right reason (not by argparse)."""
    from PIL import Image

    png = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(png)
    code = cli.main(["ask", str(png), "what is this?", "--bbox", "-0.9,51.8,-0.8,51.9"])
    assert code == 2
    assert "--bbox needs a georeferenced image" in capsys.readouterr().err
