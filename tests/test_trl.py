"""Fine-tuning with TRL's `SFTTrainer` as its docs show it: a `messages` + `images` dataset, `SFTConfig`, the processor
as `processing_class`, on a tiny LVTC checkpoint saved the way users get one (remote code from its folder).

Each variant checks what would fail if it broke: TRL's loss is the model's own `labels` loss on the same batch;
assistant-only labels are exactly the bundle's own (`examples/finetune.py`: each reply and its `<|im_end|>`); padded and
padding-free (and packed) text batches give the same loss and gradients; what the trainer saves reloads with
`trust_remote_code` and gives the trained model's logits (LoRA: through `peft`).
"""

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer

from tests.conftest import make_chat_bundle
from tests.utils.decoding import LVTC

QUESTIONS = ["What is in the picture?", "Which colour is it?", "How many shapes?", "Describe it."]
ANSWERS = ["a square", "red", "two", "a red square on white"]


@pytest.fixture(scope="module")
def checkpoint(bundle, tmp_path_factory):
    return make_chat_bundle(bundle, tmp_path_factory.mktemp("trl_lvtc"), seed=3, **LVTC)


def image(index: int) -> PIL.Image.Image:
    pixels = np.random.default_rng(index).integers(0, 256, (60 + 10 * index, 70, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def conversation(index: int, with_image: bool = True) -> list[dict]:
    user = [{"type": "image"}] if with_image else []
    user.append({"type": "text", "text": QUESTIONS[index]})
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[index]}]},
    ]


def image_rows() -> datasets.Dataset:
    return datasets.Dataset.from_list([{"messages": conversation(i), "images": [image(i)]} for i in range(4)])


def text_rows() -> datasets.Dataset:
    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in zip(QUESTIONS, ANSWERS)]
    return datasets.Dataset.from_list([{"messages": messages} for messages in rows])


def trainer(folder, tmp_path, dataset, peft_config=None, **config) -> SFTTrainer:
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        gradient_checkpointing=False,
        bf16=False,  # SFTConfig turns bf16 autocast on where the CPU has it; compare in fp32
    )
    settings.update(config)
    return SFTTrainer(
        model=model,
        args=SFTConfig(**settings),
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
    )


def first_batch(sft: SFTTrainer, size: int = 2) -> dict:
    return sft.data_collator([sft.train_dataset[i] for i in range(size)])


def trl_loss(sft: SFTTrainer, batch: dict) -> torch.Tensor:
    sft.model.eval()
    with torch.no_grad():
        return sft.compute_loss(sft.model, dict(batch))


def own_loss(model, batch: dict) -> torch.Tensor:
    inputs = {
        k: v
        for k, v in batch.items()
        if k in ("input_ids", "attention_mask", "pixel_values", "num_patches", "position_ids", "labels")
    }
    with torch.no_grad():
        return model(**inputs, use_cache=False).loss


def test_defaults_train_and_the_saved_model_reloads(checkpoint, tmp_path):
    sft = trainer(checkpoint, tmp_path, image_rows())
    batch = first_batch(sft)
    assert "pixel_values" in batch and int(batch["num_patches"].sum()) == batch["pixel_values"].shape[0]
    torch.testing.assert_close(trl_loss(sft, batch), own_loss(sft.model, batch), rtol=0, atol=1e-5)
    before = sft.model.lm_head.weight.detach().clone()
    sft.train()
    assert not torch.equal(before, sft.model.lm_head.weight)
    sft.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", trust_remote_code=True).eval()
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    sft.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, sft.model(**inputs).logits, rtol=0, atol=1e-5)


@pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.18.0.dev0"),
    reason="TRL takes assistant-only loss on image datasets from Transformers 5.18",
)
def test_assistant_only_labels_are_the_replies_and_their_end(checkpoint, tmp_path):
    from examples.finetune import ChatDataset, Row

    sft = trainer(checkpoint, tmp_path, image_rows(), assistant_only_loss=True)
    batch = first_batch(sft)
    processor = sft.processing_class
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in range(2):
        kept = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert kept[-1] == end and processor.tokenizer.decode(kept[:-1]) == ANSWERS[row]
        # the bundle's own fine-tuning data gives the same tokens and labels
        text = [
            {"role": "user", "content": f"<image>\n{QUESTIONS[row]}"},
            {"role": "assistant", "content": ANSWERS[row]},
        ]
        own = ChatDataset([Row(text, [image(row)], f"row {row}")], processor)[0]
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == own["input_ids"].tolist()
        assert batch["labels"][row, :length].tolist() == own["labels"].tolist()
    torch.testing.assert_close(trl_loss(sft, batch), own_loss(sft.model, batch), rtol=0, atol=1e-5)
    sft.train()


def test_prompt_completion_rows_learn_the_completion_only(checkpoint, tmp_path):
    rows = [{"prompt": conversation(i)[:1], "completion": conversation(i)[1:], "images": [image(i)]} for i in range(4)]
    sft = trainer(checkpoint, tmp_path, datasets.Dataset.from_list(rows))
    batch = first_batch(sft)
    tokenizer = sft.processing_class.tokenizer
    for row in range(2):
        kept = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert tokenizer.decode(kept, skip_special_tokens=True).strip() == ANSWERS[row]
    torch.testing.assert_close(trl_loss(sft, batch), own_loss(sft.model, batch), rtol=0, atol=1e-5)
    sft.train()


def test_lora_trains_saves_and_reloads_through_peft(checkpoint, tmp_path):
    from peft import LoraConfig, PeftModel

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    sft = trainer(checkpoint, tmp_path, image_rows(), peft_config=lora)
    batch = first_batch(sft)
    sft.train()
    sft.save_model(str(tmp_path / "adapter"))
    base = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    sft.model.eval()
    with torch.no_grad():
        trained = sft.model(**inputs).logits
        torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=0, atol=1e-5)
        untrained = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True)(**inputs).logits
    assert not torch.allclose(untrained, trained)  # the adapter changed something


@pytest.mark.parametrize("mode", ["padding_free", "packing"])
def test_padding_free_and_packed_text_rows_give_the_padded_losses(checkpoint, tmp_path, mode):
    """LVTC's second phase keeps packed sequences apart: the padding-free batch (one row, positions restarting) has
    the padded batch's loss and gradients. With `packing=True` TRL packs the dataset first (best-fit decreasing)."""
    padded = trainer(checkpoint, tmp_path, text_rows(), per_device_train_batch_size=4)
    flags = dict(padding_free=True, max_length=None) if mode == "padding_free" else dict(packing=True, max_length=4096)
    free = trainer(checkpoint, tmp_path, text_rows(), per_device_train_batch_size=4, **flags)
    padded_batch = first_batch(padded, 4)
    free_batch = first_batch(free, len(free.train_dataset))
    assert free_batch["input_ids"].shape[0] == 1 and "attention_mask" not in free_batch
    assert int((free_batch["position_ids"] == 0).sum()) == 4  # four sequences in one row
    losses, grads = [], []
    for sft, batch in ((padded, padded_batch), (free, free_batch)):
        sft.model.train()
        sft.model.zero_grad()
        loss = sft.compute_loss(sft.model, dict(batch))
        loss.backward()
        losses.append(loss.item())
        grads.append(sft.model.lm_head.weight.grad.clone())
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-5)
    free.train()
