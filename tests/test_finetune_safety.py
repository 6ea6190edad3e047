"""`examples/finetune.py` never destroys what it did not write, and refuses data it would train wrongly on: the model
folder as output, another run's checkpoints under rotation, a dataset name given twice, images in replies, the
processor's image tokens typed into text, malformed meta files and rows (each by file and line), and a checkpoint of
another model or stage to resume from (naming it). Real `Trainer` runs on a tiny LVTC checkpoint."""

import json
import shutil

import pytest

from examples import finetune
from tests.utils.finetune import common_args, run, write_dataset


@pytest.fixture(scope="module")
def lvtc_dir(bundle, tmp_path_factory):
    from tests.conftest import make_chat_bundle
    from tests.utils.decoding import LVTC

    return make_chat_bundle(bundle, tmp_path_factory.mktemp("safety_lvtc"), seed=2, **LVTC)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("safety_data"))


def test_the_model_folder_is_never_the_output(lvtc_dir, data, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(lvtc_dir, model)
    weights = (model / "model.safetensors").read_bytes()
    for out in (model, model / "inside"):
        with pytest.raises(ValueError, match="is the model folder .* or inside it: training would overwrite"):
            run(common_args(model, data, out, 1) + ["--stage", 2])
    assert (model / "model.safetensors").read_bytes() == weights


def test_another_run_s_checkpoints_are_neither_rotated_away_nor_overwritten(lvtc_dir, data, tmp_path):
    other = tmp_path / "checkpoint-1"
    other.mkdir()
    (other / "notes.txt").write_text("my notes")
    args = common_args(lvtc_dir, data, tmp_path, 2) + [
        "--stage",
        2,
        "--save_strategy",
        "steps",
        "--save_steps",
        1,
        "--save_total_limit",
        1,
    ]
    with pytest.raises(ValueError, match=r"already holds 1 checkpoint folders \(checkpoint-1\) that this run did not"):
        run(args)
    assert (other / "notes.txt").read_text() == "my notes"


def test_resuming_keeps_its_own_checkpoints_rotating(lvtc_dir, data, tmp_path):
    """Resuming is the same run: its checkpoints rotate as the Trainer rotates them."""
    args = common_args(lvtc_dir, data, tmp_path, 2) + ["--stage", 2]
    save = ["--save_strategy", "steps", "--save_steps", 1, "--save_total_limit", 1]
    run(args + save)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    longer = common_args(lvtc_dir, data, tmp_path, 3) + ["--stage", 2]
    run(longer + save + ["--resume_from_checkpoint", "last"])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]


def test_a_checkpoint_of_another_stage_is_refused_by_name(lvtc_dir, data, tmp_path):
    run(common_args(lvtc_dir, data, tmp_path, 1) + ["--stage", 1, "--save_strategy", "steps", "--save_steps", 1])
    checkpoint = tmp_path / "checkpoint-1"
    assert checkpoint.is_dir()
    with pytest.raises(
        ValueError,
        match=rf"cannot resume from {checkpoint}: its optimizer state holds \d+ parameters "
        r"but this run trains \d+",
    ):
        run(common_args(lvtc_dir, data, tmp_path, 2) + ["--stage", 2, "--resume_from_checkpoint", str(checkpoint)])


def test_a_checkpoint_of_another_model_is_refused_by_name(bundle, lvtc_dir, data, tmp_path):
    from tests.conftest import make_chat_bundle

    plain = make_chat_bundle(bundle, tmp_path / "plain", seed=2)  # no LVTC projectors
    run(
        common_args(plain, data, tmp_path / "plain-run", 1)
        + ["--stage", 2, "--save_strategy", "steps", "--save_steps", 1]
    )
    checkpoint = tmp_path / "plain-run" / "checkpoint-1"
    with pytest.raises(ValueError, match=rf"cannot resume from {checkpoint}: it holds 0 tensor names .* and lacks \d+"):
        run(
            common_args(lvtc_dir, data, tmp_path / "lvtc-run", 2)
            + ["--stage", 2, "--resume_from_checkpoint", str(checkpoint)]
        )


def write_meta(folder, text: str, rows: list | None = None):
    if rows is not None:
        (folder / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (folder / "meta.json").write_text(text)
    return str(folder / "meta.json")


ASK = {"from": "human", "value": "What colour?"}
ANSWER = {"from": "gpt", "value": "red"}
BAD_DATA = {
    "a dataset name given twice": (
        '{"a": {"annotation": "rows.jsonl"}, "a": {"annotation": "rows.jsonl"}}',
        [{"conversations": [ASK, ANSWER]}],
        r"dataset names \['a'\] are given more than once",
    ),
    "an image in a reply": (
        '{"a": {"annotation": "rows.jsonl"}}',
        [{"image": "x.png", "conversations": [ASK, {"from": "gpt", "value": "<image>\nthis"}]}],
        r"rows\.jsonl:1: an assistant turn holds an image",
    ),
    "image tokens typed into text": (
        '{"a": {"annotation": "rows.jsonl"}}',
        [{"conversations": [{"from": "human", "value": "Hi <IMG_CONTEXT>"}, ANSWER]}],
        r"rows\.jsonl:1: a user turn holds \['<IMG_CONTEXT>'\]",
    ),
    "not JSON": ("{nope", None, r"meta\.json: not JSON"),
    "a list, not datasets": ("[1, 2]", None, "must be an object of datasets"),
    "no annotation": ('{"a": {"root": "images"}}', None, r"dataset 'a' needs an `annotation` path"),
    "a missing annotation file": ('{"a": {"annotation": "none.jsonl"}}', None, "which is missing"),
    "a bad repeat_time": (
        '{"a": {"annotation": "rows.jsonl", "repeat_time": "twice"}}',
        [{"conversations": [ASK, ANSWER]}],
        r"dataset 'a': could not convert string",
    ),
    "a content item that is not an object": (
        '{"a": {"annotation": "rows.jsonl"}}',
        [{"messages": [{"role": "user", "content": ["hi"]}]}],
        r"rows\.jsonl:1: a content item must be an object",
    ),
    "a role that is not text": (
        '{"a": {"annotation": "rows.jsonl"}}',
        [{"messages": [{"role": ["user"], "content": "hi"}]}],
        r"rows\.jsonl:1: unknown role",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_meta_files_and_rows_are_refused_by_file_and_line(tmp_path, case):
    text, rows, message = BAD_DATA[case]
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=message):
        finetune.read_meta(write_meta(tmp_path, text, rows))
