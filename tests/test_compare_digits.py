"""`examples/compare_digits.py` reports what its runs measured: the mean ± half the spread over seeds, each seed's
accuracy in seed order, the FastV rows under their HR-only model, and it refuses a malformed `--fastv`."""

import pytest

from examples.compare_digits import fastv_settings, table


def run(variant: str, seed: int, accuracy: float, **also: float) -> dict:
    tokens = dict(lvtc=(16, 64, 112), hr_only=(64, 64, 256))[variant]
    scores = dict(accuracy=accuracy, single_accuracy=accuracy + 0.25, grid_accuracy=accuracy / 2, row_accuracy=0.0)
    return dict(
        variant=variant,
        seed=seed,
        train_seconds=100.0 * (seed + 1),
        visual_tokens_per_tile=tokens[0],
        visual_tokens_per_tile_last_layer=tokens[1],
        visual_token_layers_per_tile=tokens[2],
        **scores,
        also={name: dict(scores, accuracy=value, visual_token_layers_per_tile=112) for name, value in also.items()},
    )


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_gives_mean_half_spread_and_each_seed_in_seed_order():
    runs = [
        run("hr_only", 2, 0.5, **{"FastV K=1 R=75%": 0.25}),
        run("lvtc", 1, 0.4),
        run("lvtc", 0, 0.6),
        run("hr_only", 0, 0.7, **{"FastV K=1 R=75%": 0.45}),
    ]
    header, _, lvtc, hr_only, fastv = table(runs).splitlines()
    assert cells(header)[4:6] == ["accuracy", "accuracy by seed"]
    assert cells(lvtc)[:7] == [
        "LVTC 16 → 64 (HR + multi)",
        "16 → 64",
        "112",
        "2",
        "0.500 ± 0.100",
        "0: 0.600 · 1: 0.400",
        "0.750 ± 0.100",
    ]
    assert cells(lvtc)[-1] == "150"  # mean training seconds
    assert cells(hr_only)[3:6] == ["2", "0.600 ± 0.100", "0: 0.700 · 2: 0.500"]
    assert cells(fastv)[0] == "↳ FastV K=1 R=75% (pruned, no training)"
    assert cells(fastv)[2:6] == ["112", "2", "0.350 ± 0.100", "0: 0.450 · 2: 0.250"]  # the pruned run of each seed


def test_fastv_settings_parse_pairs_and_refuse_anything_else():
    assert fastv_settings(["1:0.75", "2:0.5"]) == {
        "FastV K=1 R=75%": dict(fastv_layer=1, fastv_ratio=0.75),
        "FastV K=2 R=50%": dict(fastv_layer=2, fastv_ratio=0.5),
    }
    with pytest.raises(SystemExit, match="K:R pairs such as 1:0.75, got '0.75'"):
        fastv_settings(["0.75"])
