"""examples/finetune.py: data, labels, collator, stages, LoRA, and real Trainer runs (one and two processes)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from examples import finetune
from tests.conftest import ROOT, child_env, make_chat_bundle
from tests.utils.compat import CHECKPOINTING
from tests.utils.finetune import common_args, run, write_dataset


@pytest.fixture(scope="module")
def lvtc_dir(bundle, tmp_path_factory):
    return make_chat_bundle(
        bundle,
        tmp_path_factory.mktemp("lvtc_bundle"),
        text=dict(num_hidden_layers=4),
        lvtc_enabled=True,
        lvtc_expand_layer=3,
        lvtc_inject_start=1,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def test_labels_supervise_only_the_replies_of_a_multi_turn_sample(lvtc_dir, data):
    processor = AutoProcessor.from_pretrained(lvtc_dir, trust_remote_code=True)
    dataset = finetune.ChatDataset(finetune.read_meta(data), processor)
    sample = dataset[2]  # image + two rounds
    tokenizer = processor.tokenizer
    supervised = sample["labels"][sample["labels"] != -100]
    assert tokenizer.decode(supervised) == "red<|im_end|>yes, red<|im_end|>"
    tiles = len(sample["pixel_values"])
    assert (sample["input_ids"] == processor.image_token_id).sum() == tiles * processor.image_seq_length
    # the tokens spell out exactly the chat template's rendering of the conversation
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "yes, red"},
    ]
    rendered = processor.apply_chat_template(messages)
    span = "<img>" + "<IMG_CONTEXT>" * (tiles * processor.image_seq_length) + "</img>"
    expanded = rendered.replace(processor.image_token, span, 1)
    assert tokenizer.decode(sample["input_ids"]) == expanded
    assert sample["input_ids"][0] == tokenizer.bos_token_id


def test_training_prompt_before_each_reply_is_the_inference_prompt(lvtc_dir, data):
    """Labels come from the template's generation blocks: the tokens before every reply are exactly what
    `apply_chat_template(..., add_generation_prompt=True)` gives at inference for the turns so far."""
    processor = AutoProcessor.from_pretrained(lvtc_dir, trust_remote_code=True)
    dataset = finetune.ChatDataset(finetune.read_meta(data), processor)
    (path,) = dataset.rows[2].images  # image + two rounds
    sample = dataset[2]
    image = PIL.Image.open(path).convert("RGB")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "yes, red"},
    ]
    labels = sample["labels"].tolist()
    starts = [i for i, label in enumerate(labels) if label != -100 and (i == 0 or labels[i - 1] == -100)]
    assert len(starts) == 2
    for start, turns in zip(starts, (1, 3)):
        prompt = processor.apply_chat_template(messages[:turns], add_generation_prompt=True)
        expected = processor(images=[image], text=[prompt])["input_ids"][0]
        assert sample["input_ids"][:start].tolist() == expected.tolist()


def test_a_template_without_generation_blocks_is_refused(lvtc_dir, data):
    processor = AutoProcessor.from_pretrained(lvtc_dir, trust_remote_code=True)
    processor.chat_template = processor.chat_template.replace("{%- generation %}", "").replace(
        "{%- endgeneration %}", ""
    )
    with pytest.raises(ValueError, match="marked none of this sample's 2 assistant replies"):
        finetune.ChatDataset(finetune.read_meta(data), processor)[2]


def test_the_chat_format_is_written_in_one_place(bundle):
    """Only the processor's template renders the chat format; the checkpoints this repository ships save that same
    template. A second rendering elsewhere (an f-string in a script, say) could drift away from it unnoticed. (The
    tests and `devtools/`, which writes source checkpoints with InternLM2's special tokens, are not renderings.)"""
    sources = [
        path
        for path in ROOT.rglob("*.py")
        if not path.relative_to(ROOT).parts[0].startswith((".", "tests", "devtools")) and not path.is_symlink()
    ]
    users = sorted(str(path.relative_to(ROOT)) for path in sources if "<|im_start|>" in path.read_text())
    assert users == ["processing_internvl_x.py"]
    processing = (ROOT / "processing_internvl_x.py").read_text()
    template = processing[
        processing.index("CHAT_TEMPLATE = (") : processing.index("\n)\n", processing.index("CHAT_TEMPLATE = ("))
    ]
    outside = processing.replace(template, "").replace('CHAT_START_TOKEN = "<|im_start|>"', "")
    assert "<|im_start|>" not in outside
    expected = bundle.load("processing_internvl_x.CHAT_TEMPLATE")
    for saved in ROOT.glob("examples/**/chat_template.jinja"):
        assert saved.read_text() == expected, saved


def test_image_is_placed_in_the_first_turn_when_the_text_has_no_placeholder(lvtc_dir, data):
    processor = AutoProcessor.from_pretrained(lvtc_dir, trust_remote_code=True)
    sample = finetune.ChatDataset(finetune.read_meta(data), processor)[0]
    text = processor.tokenizer.decode(sample["input_ids"])
    assert "<|im_start|>user\n<img>" in text and text.count("<img>") == 1


def test_collator_on_a_mixed_batch(lvtc_dir, data):
    processor = AutoProcessor.from_pretrained(lvtc_dir, trust_remote_code=True)
    dataset = finetune.ChatDataset(finetune.read_meta(data), processor)
    samples = [dataset[0], dataset[3], dataset[1]]  # image, text only, image
    pad = processor.tokenizer.pad_token_id
    for side in ("right", "left"):
        batch = finetune.ChatCollator(pad, padding_side=side)(samples)
        lengths = [len(s["input_ids"]) for s in samples]
        assert batch["input_ids"].shape == (3, max(lengths))
        assert batch["attention_mask"].sum(1).tolist() == lengths
        short = lengths.index(min(lengths))
        padded = batch["attention_mask"][short] == 0
        assert (batch["input_ids"][short][padded] == pad).all() and (batch["labels"][short][padded] == -100).all()
        assert padded[0 if side == "left" else -1]
        assert torch.equal(batch["pixel_values"], torch.cat([samples[0]["pixel_values"], samples[2]["pixel_values"]]))
        assert batch["num_patches"].tolist() == [len(samples[0]["pixel_values"]), len(samples[2]["pixel_values"])]
    text_only = finetune.ChatCollator(pad)([dataset[3], dataset[7]])
    assert "pixel_values" not in text_only and "num_patches" not in text_only
    model = AutoModelForImageTextToText.from_pretrained(lvtc_dir, trust_remote_code=True)
    assert torch.isfinite(model(**finetune.ChatCollator(pad)(samples)).loss)
    # With a padding tile (what finetune.py uses): text-only batches carry one, marked as padding; the loss is the same
    collator = finetune.ChatCollator(pad, padding_tile=finetune.padding_tile(model.config))
    padded = collator([dataset[3], dataset[7]])
    assert padded["pixel_values"].shape == (1, 3, model.config.tile_size, model.config.tile_size)
    assert padded["image_flags"].tolist() == [0] and "num_patches" not in padded
    torch.testing.assert_close(model(**padded).loss, model(**text_only).loss, rtol=0, atol=0)
    assert "image_flags" not in collator(samples)


def test_stage_1_changes_only_the_projectors(lvtc_dir, data, tmp_path):
    before = load_file(lvtc_dir / "model.safetensors")
    run(common_args(lvtc_dir, data, tmp_path, 3) + ["--stage", 1])
    after = load_file(tmp_path / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    projector_prefixes = finetune.PROJECTOR_PREFIXES
    assert changed and all(name.startswith(projector_prefixes) for name in changed)
    assert any(name.startswith("model.lvtc_hr_projector.") for name in changed)
    assert any(name.startswith("model.multi_modal_projector.") for name in changed)


def test_full_stage_2_lowers_the_loss_with_gradient_checkpointing(lvtc_dir, data, tmp_path):
    run(
        common_args(lvtc_dir, data, tmp_path, 40)
        + ["--stage", 2, f"--{CHECKPOINTING}", "--lr_scheduler_type", "constant"]
    )
    history = (
        json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
        if (tmp_path / "trainer_state.json").exists()
        else None
    )
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    original = AutoModelForImageTextToText.from_pretrained(lvtc_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    batch = finetune.ChatCollator(processor.tokenizer.pad_token_id)(
        [finetune.ChatDataset(finetune.read_meta(data), processor)[i] for i in range(8)]
    )
    with torch.no_grad():
        assert model(**batch).loss < 0.5 * original(**batch).loss
    assert history is None or history  # trainer_state.json is only written with checkpoints


def assert_ends_where_uninterrupted_ends(resumed: Path, uninterrupted: Path, checkpoint: Path):
    """The weights a resumed run saved equal the uninterrupted run's, to 1 % of what the resumed steps changed (norms
    over the whole model). Not element by element to 1e-6, as this once did: that failed once in CI (lm_head.weight,
    on 5.17), not reproducible alone. Adam divides each gradient by its own running size, so an element whose gradient
    is rounding noise may move by up to the learning rate either way when a matrix product rounds differently (CPU
    BLAS kernels may, e.g. by memory alignment, which differs between processes and runs). A broken resume (a fresh
    optimizer and schedule from `checkpoint`) differs by about twice what the steps changed: 200 times the bound."""
    end, expected, start = (load_file(folder / "model.safetensors") for folder in (resumed, uninterrupted, checkpoint))
    assert end.keys() == expected.keys()

    def norm(tensors) -> float:
        return sum(float(t.double().square().sum()) for t in tensors) ** 0.5

    changed = norm(expected[name] - start[name] for name in expected)
    assert changed > 0  # the resumed steps did train
    assert norm(end[name] - expected[name] for name in expected) <= 1e-2 * changed


def test_resumed_run_ends_where_the_uninterrupted_run_ends(lvtc_dir, data, tmp_path):
    """Also: evaluation logs a loss, and `save_total_limit` removes the oldest checkpoint."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    extra = [
        "--stage",
        2,
        "--save_strategy",
        "steps",
        "--save_steps",
        2,
        "--save_total_limit",
        2,
        "--eval_strategy",
        "steps",
        "--eval_steps",
        3,
        "--eval_meta_path",
        data,
    ]
    run(common_args(lvtc_dir, data, first, 6) + extra)
    assert sorted(p.name for p in first.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # 2 was removed
    history = json.loads((first / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(eval_losses) == 2 and all(np.isfinite(eval_losses))

    run(common_args(lvtc_dir, data, resumed, 6) + extra + ["--resume_from_checkpoint", first / "checkpoint-4"])
    state = json.loads((resumed / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert_ends_where_uninterrupted_ends(resumed, first, first / "checkpoint-4")


# A training run that SIGKILLs itself (as `kill -9`) while the Trainer writes checkpoint-4: after the weights, before
# trainer_state.json (which the Trainer writes last), or halfway through the weights file.
KILLED_WHILE_SAVING = """
import os, signal, sys
sys.path.insert(0, {root!r})
import transformers
from examples import finetune

point = {point!r}
if point == "before the trainer state":
    save_to_json = transformers.TrainerState.save_to_json
    def die_at_step_4(self, path):
        if self.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return save_to_json(self, path)
    transformers.TrainerState.save_to_json = die_at_step_4
else:
    save_model = transformers.Trainer.save_model
    def die_halfway(self, output_dir=None, _internal_call=False):
        if self.state.global_step == 4:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "model.safetensors"), "wb") as partial:
                partial.write(b"\\0" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        return save_model(self, output_dir, _internal_call=_internal_call)
    transformers.Trainer.save_model = die_halfway
finetune.main({argv!r})
"""


@pytest.mark.parametrize("point", ["before the trainer state", "inside the weights file"])
def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(lvtc_dir, data, tmp_path, point, caplog):
    first, killed = tmp_path / "first", tmp_path / "killed"
    extra = ["--stage", 2, "--save_strategy", "steps", "--save_steps", 2]
    run(common_args(lvtc_dir, data, first, 6) + extra)
    argv = [str(a) for a in common_args(lvtc_dir, data, killed, 6) + extra]
    code = KILLED_WHILE_SAVING.format(root=str(ROOT), point=point, argv=argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == -9, result.stderr[-2000:]
    assert not (killed / "checkpoint-4" / "trainer_state.json").exists()

    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-4: it lacks .*trainer_state\.json"):
        run(common_args(lvtc_dir, data, killed, 6) + extra + ["--resume_from_checkpoint", killed / "checkpoint-4"])
    with caplog.at_level("WARNING", logger=finetune.logger.name):
        run(common_args(lvtc_dir, data, killed, 6) + extra + ["--resume_from_checkpoint", "last"])  # checkpoint-2
    assert any("skipping" in r.message and "checkpoint-4" in r.message for r in caplog.records)
    assert json.loads((killed / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    assert_ends_where_uninterrupted_ends(killed, first, killed / "checkpoint-2")


def test_lora_stage_2_trains_and_merges_into_a_reloadable_model(lvtc_dir, data, tmp_path):
    run(common_args(lvtc_dir, data, tmp_path, 5) + ["--stage", 2, "--lora_rank", 4, "--freeze_vision"])
    assert (tmp_path / "adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    original = AutoModelForImageTextToText.from_pretrained(lvtc_dir, trust_remote_code=True)
    assert type(merged).__name__ == "InternVLXForConditionalGeneration"
    merged_state, original_state = merged.state_dict(), original.state_dict()
    assert merged_state.keys() == original_state.keys()
    changed = {n for n in merged_state if not torch.equal(merged_state[n], original_state[n])}
    assert any(".language_model.layers." in n and "q_proj" in n for n in changed)  # merged LoRA deltas
    assert any(n.startswith("model.multi_modal_projector.") for n in changed)  # projectors fully trained
    assert not any(".vision_tower." in n for n in changed)  # --freeze_vision


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"],
    # Accelerate's DDP launcher; on a CPU-only machine `--use_cpu` below makes the two processes train on the CPU
    "accelerate": [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29532",
    ],
}


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_launch(lvtc_dir, data, tmp_path, launcher):
    env = child_env(OMP_NUM_THREADS="1")
    command = [sys.executable, *LAUNCHERS[launcher], str(ROOT / "examples" / "finetune.py")]
    command += [str(a) for a in common_args(lvtc_dir, data, tmp_path, 4)]
    command += [
        "--ddp_backend",
        "gloo",
        "--save_strategy",
        "steps",
        "--save_steps",
        "4",
        "--per_device_train_batch_size",
        "2",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # 12 samples, 2 per process: two processes take 4 a step, so 4 steps are 4/3 epochs (one process: 2/3)
    assert state["epoch"] == pytest.approx(4 / 3)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "checkpoint-4", trust_remote_code=True)
    assert reloaded.config.lvtc_enabled


def test_a_distributed_run_ends_with_its_exit_handlers_run_and_its_output_flushed(tmp_path):
    """`exit_before_interpreter_teardown` (the end of a run of more than one process) skips Python's teardown only:
    the `atexit` handlers still run, buffered output and log records still arrive, and the status is the one given."""
    marker = tmp_path / "handler-ran"
    script = f"""
import atexit, logging, pathlib, sys
from examples import finetune
atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text("yes"))
logging.basicConfig(stream=sys.stderr)
logging.getLogger("run").warning("last log record")
sys.stdout.write("buffered, no newline")
finetune.exit_before_interpreter_teardown(3)
print("never reached")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout == "buffered, no newline"
    assert "last log record" in result.stderr
    assert marker.read_text() == "yes"
