"""ms-swift (`swift sft`) fine-tuning the digits demo the way its documentation does for Transformers-layout InternVL
checkpoints: `--model_type internvl --template internvl_hf` (the route for `InternVLForConditionalGeneration`, whose
layout this bundle has). ms-swift 4.6 needs Transformers below 5.20, so it runs from `.venv-swift`, a folder layered
over `.venv` (`make test-swift`); elsewhere the file is skipped.

ms-swift merges the image features into `inputs_embeds` itself and calls the model without `input_ids` or
`pixel_values`. That is exact for the plain and PVTC models; LVTC (and FastV) must see where the images are, so the
model refuses such a call by name at the first step (tests/test_errors.py has the model-side test).

ms-swift's `internvl_hf` template has no default system message, while InternVL2-style checkpoints (and this bundle's
chat template) carry one: `--system` gives it, and then ms-swift's first loss equals the loss the bundle's own
processor gives the same row, to float32 rounding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("swift", reason="ms-swift runs from its own site folder: make test-swift")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from devtools.bundle import ROOT  # noqa: E402
from tests.utils.tiny import SYSTEM  # noqa: E402

DEMO = ROOT / "examples" / "digits-demo"
EXAMPLES = json.loads((DEMO / "examples.json").read_text())


@pytest.fixture(scope="module")
def pvtc(tmp_path_factory) -> Path:
    """The digits demo with LVTC off (its PVTC model), saved with its processor."""
    folder = tmp_path_factory.mktemp("pvtc")
    model = AutoModelForImageTextToText.from_pretrained(DEMO, trust_remote_code=True, lvtc_enabled=False)
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(DEMO, trust_remote_code=True).save_pretrained(folder)
    return folder


# One row in ms-swift's own format: two images in one turn (a video given as its frames, `Frame-i: <image>` lines,
# which is how this route takes videos: see docs/fine-tuning.md).
ROW = {
    "messages": [
        {"role": "user", "content": "Frame-1: <image>\nFrame-2: <image>\nWhich digits are these?"},
        {"role": "assistant", "content": EXAMPLES[0]["answer"] + " " + EXAMPLES[1]["answer"]},
    ],
    "images": [str(DEMO / EXAMPLES[0]["image"]), str(DEMO / EXAMPLES[1]["image"])],
}


def swift_sft(model: Path, folder: Path, *options: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`swift sft` on ROW in a process of its own (as `swift sft` runs it), on the CPU in float32; the result and
    the steps' logged records."""
    data = folder / "data.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    command = [sys.executable, "-m", "swift.cli.sft", "--model", str(model), "--model_type", "internvl"]
    command += ["--template", "internvl_hf", "--system", SYSTEM, "--dataset", str(data)]
    command += ["--output_dir", str(folder / "output"), "--per_device_train_batch_size", "1", "--logging_steps", "1"]
    command += ["--torch_dtype", "float32", "--dataloader_num_workers", "0", "--dataset_num_proc", "1"]
    command += ["--split_dataset_ratio", "0", "--report_to", "none", "--use_hf", "true", "--seed", "0", *options]
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=folder)
    logs = [json.loads(line) for path in (folder / "output").glob("v*/logging.jsonl") for line in path.open()]
    return result, [record for record in logs if "loss" in record]


def last_checkpoint(folder: Path) -> Path:
    checkpoints = sorted((folder / "output").glob("v*/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, list((folder / "output").rglob("*"))
    return checkpoints[-1]


def row_prompt(processor) -> tuple[str, list]:
    """ROW's question through the bundle's chat template (its `<image>` tags as image parts), and its images."""
    content = []
    for i, text in enumerate(ROW["messages"][0]["content"].split("<image>")):
        content += ([{"type": "image"}] if i else []) + ([{"type": "text", "text": text}] if text else [])
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt, [Image.open(path).convert("RGB") for path in ROW["images"]]


def row_loss(model, processor) -> float:
    """ROW's loss through the bundle's processor, labels on what ms-swift labels: the answer, its `<|im_end|>` and
    the newline after it."""
    prompt, images = row_prompt(processor)
    inputs = processor(text=prompt + ROW["messages"][1]["content"] + "<|im_end|>\n", images=images, return_tensors="pt")
    prompt_length = processor(text=prompt, images=images, return_tensors="pt")["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_length] = -100
    with torch.no_grad():
        return model(**inputs, labels=labels).loss.item()


def row_answer(model, processor) -> str:
    """The greedy answer to ROW's question, through the bundle's processor and `generate`."""
    prompt, images = row_prompt(processor)
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_full_fine_tuning_is_exact_trains_and_reloads_through_auto_model(pvtc, tmp_path):
    """Eight steps on ROW: the reloaded checkpoint answers ROW's question with ROW's answer; the base model does not."""
    options = ("--tuner_type", "full", "--freeze_vit", "true", "--max_steps", "8", "--save_steps", "8")
    result, logs = swift_sft(pvtc, tmp_path, *options, "--learning_rate", "1e-3")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    base = AutoModelForImageTextToText.from_pretrained(pvtc, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(pvtc, trust_remote_code=True)
    before = row_loss(base, processor)
    assert logs[0]["loss"] == pytest.approx(before, rel=1e-5), "ms-swift's inputs differ from the processor's"
    assert row_answer(base, processor) != ROW["messages"][1]["content"]
    checkpoint = last_checkpoint(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).eval()
    reloaded = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    assert row_loss(model, reloaded) < before
    assert row_answer(model, reloaded) == ROW["messages"][1]["content"]
    weights = load_file(pvtc / "model.safetensors")
    moved = [name for name, tensor in model.state_dict().items() if not torch.equal(tensor, weights[name])]
    assert any(name.startswith("model.language_model.") for name in moved), "the language model did not train"
    assert not any(name.startswith("model.vision_tower.") for name in moved), "--freeze_vit was not honoured"


def test_lora_adapters_train_and_load_on_the_base_model(pvtc, tmp_path):
    from peft import PeftModel

    options = ("--tuner_type", "lora", "--lora_rank", "8", "--max_steps", "12", "--save_steps", "12")
    result, logs = swift_sft(pvtc, tmp_path, *options, "--learning_rate", "5e-3")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    checkpoint = last_checkpoint(tmp_path)
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    trained = [name for name, tensor in adapter.items() if "lora_B" in name and tensor.abs().sum() > 0]
    assert trained and all(".language_model." in name for name in trained), sorted(adapter)[:10]
    base = AutoModelForImageTextToText.from_pretrained(pvtc, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(pvtc, trust_remote_code=True)
    before = row_loss(base, processor)
    assert logs[0]["loss"] == pytest.approx(before, rel=1e-5)
    model = PeftModel.from_pretrained(base, checkpoint).eval()
    assert row_loss(model, processor) < before
    assert row_answer(model, processor) == ROW["messages"][1]["content"]


def test_an_lvtc_checkpoint_is_refused_at_the_first_step_by_name(tmp_path):
    """ms-swift would train LVTC as the plain model (no expansion, no HR tokens): the first step is refused."""
    result, logs = swift_sft(DEMO, tmp_path, "--tuner_type", "full", "--max_steps", "1", "--save_steps", "1")
    assert result.returncode != 0 and not logs
    output = result.stdout + result.stderr
    assert "LVTC (each tile 64 tokens from layer 3 on instead of 16) must know where the visual tokens are" in output
    assert "examples/finetune.py" in output
    assert not list((tmp_path / "output").glob("v*/checkpoint-*"))
