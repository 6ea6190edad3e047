"""The authors' released InternVL-X layout converts into this bundle, loads cleanly and keeps the PVTC math."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conversion import convert_official_internvl_x as official
from devtools.checkpoints import VISION, released_internvl_x
from tests.utils.references import pvtc_reference

HEADS = 4


@pytest.mark.parametrize("layers", [1, 2])
def test_released_checkpoint_converts_and_projector_matches_released_tensors(tmp_path, layers):
    tensors = released_internvl_x(tmp_path / "src", seed=layers, pvtc_layers=layers)
    official.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), "--pvtc-num-heads", str(HEADS)])

    model, info = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "dst", trust_remote_code=True, output_loading_info=True
    )
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    config = model.config
    assert config.projector_type == "pvtc" and config.pvtc_num_layers == layers and config.pvtc_num_heads == HEADS

    side = VISION["image_size"] // VISION["patch_size"]
    # float64 on both sides, so the comparison sees the mapping, not float32 rounding.
    x = torch.randn(2, 1 + side * side, VISION["hidden_size"], generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        out = model.eval().double().model.multi_modal_projector(x)
    w = lambda name: tensors[f"projector.{name}" if name == "cls_scale" else f"projector.{name}.weight"].double()  # noqa: E731
    for tile in range(2):
        expected = pvtc_reference(w, x[tile], side, 2, HEADS, layers)
        torch.testing.assert_close(out[tile], expected, rtol=0, atol=1e-9)


def test_mismatched_checkpoint_is_refused_with_the_list(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    released_internvl_x(tmp_path / "src", shards=1)
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    tensors["projector.extra.weight"] = torch.zeros(3)
    tensors["projector.mlp1.1.weight"] = torch.zeros(5, 5)
    del tensors["projector.mlp3.0.weight"]
    save_file(tensors, tmp_path / "src" / "model.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        official.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), "--pvtc-num-heads", "4"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "projector.extra.weight" in err
    assert "model.multi_modal_projector.local_mlp.linear.weight: got (5, 5), model needs (64, 128)" in err
    assert "model.multi_modal_projector.kv_mlp.norm.weight" in err


def test_destination_must_be_empty_unless_overwrite(tmp_path):
    released_internvl_x(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("x")
    args = ["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), "--pvtc-num-heads", "4"]
    with pytest.raises(SystemExit):
        official.main(args)
    with pytest.raises(SystemExit):  # --overwrite replaces only a converted checkpoint, never the user's files
        official.main([*args, "--overwrite"])
    assert (tmp_path / "dst" / "keep.txt").read_text() == "x"
    (tmp_path / "dst" / "keep.txt").unlink()
    official.main(args)
    official.main([*args, "--overwrite"])
    assert (tmp_path / "dst" / "config.json").exists()
