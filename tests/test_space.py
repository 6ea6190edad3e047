"""The web demo's workings (space/app.py) without a browser: answers, the measured tokens per layer under each
variant, the tile overlay, the intake's refusals. tests/test_space_browser.py drives the page itself in Chromium."""

import json

import pytest
from PIL import Image

from devtools.bundle import ROOT
from space.app import COLORS, Demo, build, numbers

DEMO = ROOT / "examples" / "digits-demo"
EXAMPLES = json.loads((DEMO / "examples.json").read_text())


@pytest.fixture(scope="module")
def demo():
    return Demo(DEMO)


def answer(demo, example, **variant):
    demo.use_variant(**{"lvtc": True, "fastv_ratio": 0.0, "fastv_layer": 2, **variant})
    turn = demo.user_turn(example["question"], [str(DEMO / example["image"])])
    *partial, reply = list(demo.answer([turn], 8))
    return partial, reply


def test_answers_stream_and_measure_what_lvtc_did(demo):
    """The demo's own answers, streamed token by token; the prefill's tokens per layer recorded from the layers: each
    tile 16 visual tokens in layers 0-2 and 64 from layer 3 (LVTC, k = 3 of 4); positions as the model counts them."""
    example = EXAMPLES[2]
    partial, reply = answer(demo, example)
    assert reply.text.strip() == example["answer"]
    assert partial and all(len(a.text) <= len(reply.text) for a in partial)
    visual = [count - reply.text_tokens for count in reply.layer_tokens]
    assert visual == [16 * reply.tiles] * 3 + [64 * reply.tiles]
    assert reply.prefill_s > 0 and reply.new_tokens >= 1
    inputs = demo.inputs([demo.user_turn(example["question"], [str(DEMO / example["image"])])])
    needed = int(demo.model.model.positions_needed(inputs["input_ids"], inputs["attention_mask"]))
    assert reply.positions == needed + reply.new_tokens
    assert f"| tiles | {reply.tiles} |" in numbers(reply, "LVTC")


def test_switching_variants_changes_the_tokens_each_layer_holds(demo):
    example = EXAMPLES[2]
    _, plain = answer(demo, example, lvtc=False)
    assert [count - plain.text_tokens for count in plain.layer_tokens] == [16 * plain.tiles] * 4
    _, fastv = answer(demo, example, lvtc=False, fastv_ratio=0.5, fastv_layer=2)
    visual = 16 * fastv.tiles
    kept = visual - int(visual * 0.5)
    assert [count - fastv.text_tokens for count in fastv.layer_tokens] == [visual] * 2 + [kept] * 2
    assert demo.use_variant(True, 0.0, 2).startswith("LVTC")  # back to the checkpoint's own


def test_the_tile_overlay_draws_each_rule_s_grid(demo):
    """A 300×100 image on the demo's 64-px tiles: the `ratio` rule cuts 3×1 (red, first panel), `area` and `edge` cap
    the tiles by the image's area and edges (green and blue panels); each panel's lines sit on its grid."""
    image = Image.new("RGB", (300, 100), "white")
    sheet = demo.tile_overlay(image)
    shown_width, shown_height = 256, round(100 * 256 / 300)
    assert sheet.size == (3 * (shown_width + 8), shown_height + 30)
    image_processor = demo.processor.image_processor
    for panel, (slicing, color) in enumerate(zip(("ratio", "area", "edge"), COLORS.values())):
        columns, rows = image_processor.get_tile_grid(100, 300, {"slicing": slicing})
        left = panel * (shown_width + 8) + 4
        for c in range(columns + 1):
            assert sheet.getpixel((left + round(c * (shown_width - 1) / columns), 26 + shown_height // 2)) == color
        for r in range(rows + 1):
            assert sheet.getpixel((left + shown_width // 2, 26 + round(r * (shown_height - 1) / rows))) == color
    assert image_processor.get_tile_grid(100, 300, {"slicing": "ratio"}) == (3, 1)


def test_uploads_go_through_the_server_s_intake(demo, tmp_path):
    not_an_image = tmp_path / "photo.png"
    not_an_image.write_bytes(b"this is not an image")
    turn = demo.user_turn("What digit?", [str(not_an_image)])
    with pytest.raises(ValueError, match="image 0 of the request is not an image Pillow can read"):
        list(demo.answer([turn], 4))
    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(huge)
    with pytest.raises(ValueError, match=r"10000×10000 = 100000000 pixels, more than the 40000000 allowed"):
        list(demo.answer([demo.user_turn("What digit?", [str(huge)])], 4))
    with pytest.raises(ValueError, match="the message is empty"):
        demo.user_turn("", [])


def test_the_page_builds_with_the_demo_s_examples(demo):
    import gradio

    page = build(demo)
    assert isinstance(page, gradio.Blocks)
    ids = {getattr(block, "elem_id", None) for block in page.blocks.values()}
    assert {"chat", "box", "stop", "overlay", "plot", "numbers", "status", "lvtc", "fastv"} <= ids


def test_the_space_folder_holds_the_app_and_the_demo_and_overwrites_nothing(tmp_path):
    from space.build import FILES
    from space.build import build as build_space

    out = build_space(tmp_path / "space")
    assert sorted(path.name for path in out.iterdir()) == sorted([*FILES, "digits-demo"])
    for path in (DEMO).iterdir():
        copied = out / "digits-demo" / path.name
        assert not copied.is_symlink() and copied.read_bytes() == path.read_bytes(), path.name
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "sdk: gradio" in card and "app_file: app.py" in card
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit, match="exists already"):
        build_space(tmp_path / "taken")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


def test_building_the_demo_leaves_the_process_s_media_policy_alone(demo):
    """Only the app's own process (main) takes the server policy: a Demo built elsewhere (these tests, a notebook)
    must not change how the rest of the process reads media."""
    import os

    from devtools.bundle import Bundle

    assert Bundle(DEMO).load("media_internvl_x.MEDIA_POLICY_VARIABLE") not in os.environ
