"""`examples/finetune.py` under DeepSpeed ZeRO-2 and ZeRO-3, as shipped (`examples/ds_zero2.json`, `ds_zero3.json`),
on two real `torchrun` processes on the CPU (gloo), for the plain and the LVTC model: the runs equal DDP's, a ZeRO-3
run resumed from its checkpoint ends where the uninterrupted one ends, LoRA merges under ZeRO-3, and the checkpoints
load with no missing or unexpected tensor on the oldest supported Transformers.

The data set is one image row and one text-only row, one row per process per step: every step, one process has an
image and the other none, which stopped ZeRO before padding tiles (both processes must run the vision tower).
DeepSpeed builds one communication op with g++ on first use (about 40 s), cached in ~/.cache/torch_extensions."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, child_env, make_chat_bundle

pytestmark = pytest.mark.distributed
STEPS = 6
ZERO = {name: ROOT / "examples" / f"ds_{name}.json" for name in ("zero2", "zero3", "zero3_offload")}
OLDEST = ROOT / ".venv-min"  # the oldest supported Transformers (make test installs it, see the Makefile)
OLDEST_VERSION = re.search(r"transformers==([\w.]+)", (ROOT / "requirements-min.txt").read_text()).group(1)


def write_mixed_dataset(folder: Path) -> Path:
    """One row with an image (3 tiles) and one without: with one row per process, every step mixes them."""
    (folder / "images").mkdir(parents=True)
    pixels = np.zeros((60, 120, 3), np.uint8)
    pixels[..., 0] = 220
    PIL.Image.fromarray(pixels).save(folder / "images" / "red.png")
    rows = [
        {
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}],
        },
        {"conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello there"}]},
    ]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (folder / "meta.json").write_text(json.dumps({"mixed": {"annotation": "data.jsonl", "root": "images"}}))
    return folder / "meta.json"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mixed_dataset(tmp_path_factory.mktemp("mixed-data"))


@pytest.fixture(scope="module")
def bundles(bundle, tmp_path_factory) -> dict[str, Path]:
    lvtc = dict(text=dict(num_hidden_layers=4), lvtc_enabled=True, lvtc_expand_layer=3, lvtc_inject_start=1)
    return {
        "plain": make_chat_bundle(bundle, tmp_path_factory.mktemp("plain-bundle"), seed=3),
        "lvtc": make_chat_bundle(bundle, tmp_path_factory.mktemp("lvtc-bundle"), seed=4, **lvtc),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(model_dir: Path, data: Path, out: Path, *extra, zero: str | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 examples/finetune.py` with SGD, one row per process per step, on the CPU."""
    env = child_env(OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "examples" / "finetune.py"),
        "--model_name_or_path",
        model_dir,
        "--meta_path",
        data,
        "--output_dir",
        out,
        "--max_steps",
        STEPS,
        "--per_device_train_batch_size",
        1,
        "--optim",
        "sgd",
        "--learning_rate",
        0.05,
        "--lr_scheduler_type",
        "constant",
        "--use_cpu",
        "--ddp_backend",
        "gloo",
        "--report_to",
        "none",
        "--logging_steps",
        1,
        "--seed",
        0,
        "--save_strategy",
        "steps",
        "--save_steps",
        STEPS // 2,
        *extra,
    ]
    if zero:
        command += ["--deepspeed", ZERO[zero]]
    result = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def losses(out: Path) -> list[float]:
    history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def runs(bundles, data, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Output folders of DDP, ZeRO-2 and ZeRO-3 runs of both models, each launched once."""
    outputs = {}
    for model, model_dir in bundles.items():
        for zero in ("ddp", "zero2", "zero3"):
            out = tmp_path_factory.mktemp(f"{model}-{zero}")
            launch(model_dir, data, out, zero=None if zero == "ddp" else zero)
            outputs[model, zero] = out
    return outputs


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
@pytest.mark.parametrize("model", ["plain", "lvtc"])
def test_zero_trains_as_ddp_on_mixed_batches(runs, bundles, model, zero):
    """Every step mixes an image and a text-only row across the processes; all steps run, and the losses and final
    weights equal DDP's (float32 SGD; ZeRO sums gradients in another order)."""
    reference, tested = runs[model, "ddp"], runs[model, zero]
    assert len(losses(tested)) == STEPS
    for rank in (0, 1):  # ZeRO ran, at the stage asked for, with the optimizer state split in two
        state = torch.load(
            next(tested.glob(f"checkpoint-{STEPS}/global_step*/zero_pp_rank_{rank}_*optim_states.pt")),
            weights_only=False,
        )
        assert state["ds_config"]["zero_optimization"]["stage"] == int(zero[-1])
        partitions = state["optimizer_state_dict"]["partition_count"]  # per parameter group at stage 2
        assert set(partitions if isinstance(partitions, list) else [partitions]) == {2}
    np.testing.assert_allclose(losses(tested), losses(reference), rtol=1e-4, atol=1e-5)
    expected, weights = load_file(reference / "model.safetensors"), load_file(tested / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    original = load_file(bundles[model] / "model.safetensors")
    assert any(not torch.equal(weights[name], original[name]) for name in original if ".vision_tower." in name)


def test_a_resumed_zero_3_run_ends_where_the_uninterrupted_one_ends(runs, bundles, data, tmp_path):
    uninterrupted = runs["lvtc", "zero3"]
    checkpoint = uninterrupted / f"checkpoint-{STEPS // 2}"
    assert list(checkpoint.glob("global_step*")), "ZeRO-3 writes its partitioned states beside the weights"
    launch(bundles["lvtc"], data, tmp_path, "--resume_from_checkpoint", checkpoint, zero="zero3")
    expected, resumed = load_file(uninterrupted / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert losses(tmp_path)[-1] == pytest.approx(losses(uninterrupted)[-1], abs=1e-6)


def test_lora_merges_under_zero_3_and_reports_the_trainable_parameters(bundles, data, tmp_path):
    result = launch(bundles["lvtc"], data, tmp_path, "--lora_rank", 4, "--freeze_vision", zero="zero3")
    from transformers import AutoModelForImageTextToText

    original = AutoModelForImageTextToText.from_pretrained(bundles["lvtc"], trust_remote_code=True)
    total = sum(p.numel() for p in original.parameters())
    report = [line for line in (result.stdout + result.stderr).splitlines() if "trainable parameters:" in line]
    assert report, "finetune.py reports its trainable parameters"
    trainable, of_total = (int(word) for word in report[0].split("trainable parameters:")[1].split(" of "))
    assert 0 < trainable < of_total and of_total > total  # LoRA adds its adapters to the model's own parameters
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    merged_state, original_state = merged.state_dict(), original.state_dict()
    assert merged_state.keys() == original_state.keys()
    changed = {name for name in merged_state if not torch.equal(merged_state[name], original_state[name])}
    assert any(".language_model.layers." in name and "q_proj" in name for name in changed)  # merged LoRA deltas
    assert not any(".vision_tower." in name for name in changed)  # --freeze_vision


def test_zero_3_with_the_optimizer_on_the_cpu_trains_as_ddp_with_adamw(bundles, data, tmp_path):
    """`examples/ds_zero3_offload.json` (for the 8B model on small GPUs): DeepSpeed's CPU Adam keeps the optimizer
    states; the result equals DDP with PyTorch's AdamW (Adam's first steps divide by small gradients, so the
    tolerance is wider than SGD's)."""
    adamw = ["--optim", "adamw_torch", "--learning_rate", 1e-3]
    launch(bundles["plain"], data, tmp_path / "ddp", *adamw)
    launch(bundles["plain"], data, tmp_path / "offload", *adamw, zero="zero3_offload")
    state = torch.load(
        next((tmp_path / "offload").glob(f"checkpoint-{STEPS}/global_step*/*rank_0_*optim_states.pt")),
        weights_only=False,
    )
    assert state["ds_config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    np.testing.assert_allclose(losses(tmp_path / "offload"), losses(tmp_path / "ddp"), rtol=1e-4, atol=1e-5)
    expected, weights = (
        load_file(tmp_path / "ddp" / "model.safetensors"),
        load_file(tmp_path / "offload" / "model.safetensors"),
    )
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_zero_checkpoints_load_on_the_oldest_transformers(runs, zero):
    """Every tensor under the bundle's own names: Transformers 5.17 loads them with nothing missing or unexpected."""
    assert (OLDEST / "transformers").is_dir(), "make test installs the oldest supported Transformers in .venv-min"
    checkpoints = [runs["lvtc", zero], runs["lvtc", zero] / f"checkpoint-{STEPS // 2}"]
    script = (
        "import json, sys, transformers\n"
        "from transformers import AutoModelForImageTextToText\n"
        "for path in sys.argv[1:]:\n"
        "    _, info = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True,\n"
        "                                                          output_loading_info=True)\n"
        "    print(json.dumps([transformers.__version__, {k: sorted(map(str, v)) for k, v in info.items()}]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(OLDEST))
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, checkpoints)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(reports) == len(checkpoints)
    for version, info in reports:
        assert version == OLDEST_VERSION
        assert not info["missing_keys"] and not info["unexpected_keys"], info
    expected = load_file(runs["lvtc", zero] / "model.safetensors")
    assert all(name.startswith(("model.", "lm_head.")) and ".model.model." not in name for name in expected)
