"""The vLLM plugin's LVTC geometry (`vllm_plugin/internvl_x_vllm/layout.py`), without vLLM: for prompts of random tile
layouts and every way of cutting them into engine steps, the short sub-batch each step runs the layers before k on is
the bundle's short stream, at the bundle's short positions, and each tile is expanded in the step that completes it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.bundle import Bundle
from vllm_plugin.internvl_x_vllm.layout import prompt_layout, step_layout, text_layout

IMAGE = 9  # the image token's id in these prompts; text tokens are 100 and up


@pytest.fixture(scope="module")
def build_lvtc_layout():
    return Bundle().load("modeling_internvl_x.build_lvtc_layout")


@st.composite
def prompts(draw):
    """A long-stream prompt: text runs between images of 1-5 tiles, each tile `long_tokens` image tokens; the geometry
    (N1², N2²) drawn too."""
    short_side = draw(st.sampled_from([1, 2, 4]))
    long_side = short_side * draw(st.sampled_from([1, 2, 4]))
    images = draw(st.lists(st.integers(1, 5), max_size=3))
    texts = draw(st.lists(st.integers(0, 7), min_size=len(images) + 1, max_size=len(images) + 1))
    texts[-1] = max(texts[-1], 1)  # a prompt ends in text (the assistant's turn)
    ids = []
    for number, text in enumerate(texts):
        ids += [100 + number] * text
        if number < len(images):
            ids += [IMAGE] * (images[number] * long_side**2)
    return ids, short_side**2, long_side**2


def bundle_short_stream(ids: list[int], short_tokens: int, long_tokens: int):
    """The prompt as the bundle runs layers < k on it (each tile's N1² tokens), and where the bundle puts each of its
    text tokens and tiles in the long stream (`build_lvtc_layout`, the oracle)."""
    short_ids, run = [], 0
    for token in ids:
        run = run + 1 if token == IMAGE else 0
        if token != IMAGE or (run - 1) % long_tokens < short_tokens:
            short_ids.append(token)
    return torch.tensor(short_ids)


def cuts(draw, layout, length: int) -> list[int]:
    """Step boundaries that cut no tile."""
    inside = set()
    for tile in layout.tile_rows.tolist():
        inside.update(range(tile[0] + 1, tile[-1] + 1))
    allowed = [p for p in range(1, length) if p not in inside]
    chosen = sorted(draw(st.sets(st.sampled_from(allowed), max_size=4))) if allowed else []
    return [0, *chosen, length]


@settings(max_examples=60, deadline=None)
@given(prompt=prompts(), data=st.data())
def test_every_step_runs_the_bundle_s_short_stream(build_lvtc_layout, prompt, data):
    ids, short_tokens, long_tokens = prompt
    layout = prompt_layout(ids, IMAGE, short_tokens, long_tokens, build_lvtc_layout)
    short_ids = bundle_short_stream(ids, short_tokens, long_tokens)
    assert layout.short_length == len(short_ids)
    boundaries = cuts(data.draw, layout, len(ids))
    decoded = data.draw(st.integers(0, 3))
    windows = [(start, end - start) for start, end in zip(boundaries, boundaries[1:])]
    windows += [(len(ids) + step, 1) for step in range(decoded)]
    seen_short, expanded = [], []
    long_ids = torch.tensor(ids + [200 + step for step in range(decoded)])
    for computed, scheduled in windows:
        step = step_layout([(layout, computed, scheduled)], short_tokens)
        rows = step.short_rows + computed
        seen_short += step.short_positions.tolist()
        # what a short row holds: the bundle's short token at that position (decoded ones follow the prompt)
        expected = [short_ids[s] if s < len(short_ids) else 200 + s - len(short_ids) for s in step.short_positions]
        assert long_ids[rows].tolist() == [int(t) for t in expected]
        if len(rows):
            assert int(step.seq_lens[0]) == int(step.short_positions[-1]) + 1
        for tile_rows, carriers in zip(step.tile_rows, step.tile_carriers):
            expanded.append((tile_rows + computed).tolist())
            assert torch.equal(step.short_rows[carriers], tile_rows[:short_tokens])
    assert seen_short == list(range(len(short_ids) + decoded))  # each short token once, in order
    assert expanded == layout.tile_rows.tolist()  # each tile expanded once, in the step that completes it


@settings(max_examples=30, deadline=None)
@given(prompt=prompts(), cut=st.integers(1, 10**6))
def test_a_step_that_cuts_a_tile_is_refused(build_lvtc_layout, prompt, cut):
    ids, short_tokens, long_tokens = prompt
    layout = prompt_layout(ids, IMAGE, short_tokens, long_tokens, build_lvtc_layout)
    inner = [p for tile in layout.tile_rows.tolist() for p in range(tile[0] + 1, tile[-1] + 1)]
    if not inner:
        return
    end = inner[cut % len(inner)]
    with pytest.raises(ValueError, match=r"cutting tile \d+ .* expands a tile from all of its carriers at once"):
        step_layout([(layout, 0, end)], short_tokens)


def test_a_batch_of_requests_is_laid_out_request_by_request(build_lvtc_layout):
    """Two prompts and a text-only request in one step: their short rows, positions and lengths side by side."""
    first = prompt_layout([1, IMAGE, IMAGE, IMAGE, IMAGE, 2], IMAGE, 1, 4, build_lvtc_layout)
    second = prompt_layout(
        [3, 3, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 4], IMAGE, 1, 4, build_lvtc_layout
    )
    step = step_layout([(first, 0, 6), (text_layout(5), 4, 1), (second, 11, 1)], short_tokens=1)
    assert step.short_rows.tolist() == [0, 1, 5, 6, 7]
    assert step.short_positions.tolist() == [0, 1, 2, 4, 5]  # the decoded row of `second` is its short token 5
    assert step.query_start_loc.tolist() == [0, 3, 4, 5] and step.seq_lens.tolist() == [3, 5, 6]
    assert step.tile_rows.tolist() == [[1, 2, 3, 4]] and step.tile_carriers.tolist() == [[1]]
