"""LVTC's geometry for an engine that schedules one token stream per request.

vLLM schedules the *long* stream: every tile holds N2² rows, as in the layers from k on. The layers before k run on the
*short* stream (N1² tokens per tile), so each step they run on a sub-batch of the scheduled rows: the text, each tile's
first N1² rows (the *carriers* of its short tokens) and the decoded tokens, at their short positions. This module says,
for a prompt and for each step, which rows those are. It is pure torch (the property tests run it without vLLM) and
takes the long position of every short token from the bundle's own `build_lvtc_layout`, the one home of LVTC's geometry.
"""

from dataclasses import dataclass

import torch


@dataclass
class PromptLayout:
    """One request's prompt in both streams: P2 long rows, P1 short tokens.

    `short_of_long (P2,)` is each long row's short position, or -1 for a tile row that is not a carrier;
    `tile_rows (T, N2²)` are each tile's long rows, the first N1² its carriers. Rows past the prompt (decoded tokens)
    have short position `p - growth`.
    """

    short_of_long: torch.Tensor
    tile_rows: torch.Tensor
    short_length: int

    @property
    def long_length(self) -> int:
        return self.short_of_long.shape[0]

    @property
    def growth(self) -> int:
        """P2 - P1: how far the long stream runs ahead of the short one after the prompt."""
        return self.long_length - self.short_length


def prompt_layout(
    prompt_ids, image_token_id: int, short_tokens: int, long_tokens: int, build_lvtc_layout
) -> PromptLayout:
    """The layout of a prompt given as long-stream token ids (each tile `long_tokens` image tokens in a row; the tiles
    of an image back to back). `build_lvtc_layout` is the bundle's: the long position of each short token is read from
    it and checked against the prompt's own image rows."""
    long_ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    image = long_ids == image_token_id
    rows = image.nonzero().flatten()
    if rows.numel() % long_tokens:
        raise ValueError(f"the prompt holds {rows.numel()} image tokens, not whole tiles of {long_tokens}.")
    tile_rows = rows.view(-1, long_tokens)
    if tile_rows.numel() and not bool((tile_rows == tile_rows[:, :1] + torch.arange(long_tokens)).all()):
        raise ValueError(f"each tile's {long_tokens} image tokens must be consecutive in the prompt.")
    keep = ~image
    keep[tile_rows[:, :short_tokens].flatten()] = True  # the carriers
    short_image = image[keep]
    short_length = int(keep.sum())
    layout = build_lvtc_layout(short_image[None], None, torch.arange(short_length)[None], short_tokens, long_tokens)
    long_of_short = torch.empty(short_length, dtype=torch.long)
    long_of_short[layout.text_short] = layout.text_long
    long_of_short[short_image.nonzero().flatten()] = layout.tile_long[:, :short_tokens].flatten()
    if not torch.equal(layout.tile_long, tile_rows) or not torch.equal(long_of_short, keep.nonzero().flatten()):
        raise AssertionError("the bundle's LVTC layout and the prompt's image rows disagree")
    short_of_long = torch.full((long_ids.shape[0],), -1, dtype=torch.long)
    short_of_long[long_of_short] = torch.arange(short_length)
    return PromptLayout(short_of_long, tile_rows, short_length)


def text_layout(length: int) -> PromptLayout:
    """The layout of a prompt without images: both streams are the prompt."""
    return PromptLayout(torch.arange(length), torch.zeros(0, 1, dtype=torch.long), length)


@dataclass
class StepLayout:
    """The short sub-batch of one engine step, over the step's scheduled rows (requests in batch order).

    `short_rows (n,)`: the scheduled rows the layers before k run on; `short_positions (n,)` their short positions;
    `query_start_loc (R + 1,)` where each request's short rows start among them; `seq_lens (R,)` the short tokens each
    request holds after the step; `tile_rows (t, N2²)` the scheduled rows of the tiles this step completes, and
    `tile_carriers (t, N1²)` their carriers' places in the short sub-batch.
    """

    short_rows: torch.Tensor
    short_positions: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    tile_rows: torch.Tensor
    tile_carriers: torch.Tensor


def step_layout(windows: list[tuple[PromptLayout, int, int]], short_tokens: int) -> StepLayout:
    """The short sub-batch of a step that schedules, for each request in batch order, `(layout, computed, scheduled)`:
    the long rows `[computed, computed + scheduled)`. A tile cut by the step's window is refused: its expansion needs
    all of its carriers' outputs of layer k - 1, which no cache keeps."""
    short_rows, short_positions, seq_lens, tile_rows, tile_carriers = [], [], [], [], []
    query_start_loc = [0]
    row_offset = short_offset = 0
    for layout, computed, scheduled in windows:
        end = computed + scheduled
        positions = torch.arange(computed, end)
        in_prompt = positions < layout.long_length
        short = torch.where(
            in_prompt,
            layout.short_of_long[positions.clamp(max=layout.long_length - 1)],
            positions - layout.growth,
        )
        kept = (short >= 0).nonzero().flatten()
        short_rows.append(kept + row_offset)
        short_positions.append(short[kept])
        if end <= layout.long_length:
            seq_lens.append(int((layout.short_of_long[:end] >= 0).sum()))
        else:
            seq_lens.append(end - layout.growth)
        tiles = layout.tile_rows
        if tiles.numel():
            inside = (tiles >= computed) & (tiles < end)
            cut = inside.any(1) & ~inside.all(1)
            if bool(cut.any()):
                tile = int(cut.nonzero()[0])
                raise ValueError(
                    f"a step schedules rows [{computed}, {end}) of a request, cutting tile {tile} (rows "
                    f"{int(tiles[tile, 0])}..{int(tiles[tile, -1])}): LVTC expands a tile from all of its carriers at "
                    "once. Serve with disable_chunked_mm_input (the plugin sets it) and a token budget of at least one "
                    "image's long stream; vLLM before 0.34 may still cut an image when a step's budget runs short."
                )
            done = tiles[inside.all(1)]
            if done.numel():
                tile_rows.append(done - computed + row_offset)
                carrier_short = layout.short_of_long[done[:, :short_tokens]]
                first_short = int(short[kept[0]]) if kept.numel() else 0
                tile_carriers.append(carrier_short - first_short + short_offset)
        row_offset += scheduled
        short_offset += kept.numel()
        query_start_loc.append(short_offset)
    long_tokens = next((rows.shape[1] for rows in tile_rows), 1)
    return StepLayout(
        short_rows=torch.cat(short_rows) if short_rows else torch.zeros(0, dtype=torch.long),
        short_positions=torch.cat(short_positions) if short_positions else torch.zeros(0, dtype=torch.long),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        tile_rows=torch.cat(tile_rows) if tile_rows else torch.zeros(0, long_tokens, dtype=torch.long),
        tile_carriers=torch.cat(tile_carriers) if tile_carriers else torch.zeros(0, short_tokens, dtype=torch.long),
    )


def slot_mapping(block_table: torch.Tensor, request_of_row: torch.Tensor, positions: torch.Tensor, block_size: int):
    """The KV-cache slot of each row: `block_table[request, position // block_size] * block_size + position %
    block_size` (the layers before k store short token s in slot s of the request's blocks)."""
    blocks = block_table[request_of_row, positions // block_size].long()
    return blocks * block_size + positions % block_size
