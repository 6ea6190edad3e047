"""Weight memory of the paper models: quantized loading and DeepSpeed ZeRO partitions."""

import json

import torch

from benchmarks.common import bundle_classes
from benchmarks.harness import suite
from devtools.bundle import ROOT


def paper_models() -> dict[str, "torch.nn.Module"]:
    """InternVL-X-2B and -8B (PVTC + LVTC as in config.json; the 8B language model as FACTS.md gives it), built on
    the meta device: their parameters, no memory."""
    classes = bundle_classes()
    eight_b = dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    )
    models = {}
    for name, overrides in {
        "InternVL-X-2B": {},
        "InternVL-X-8B": dict(text_config=eight_b, lvtc_expand_layer=23),
    }.items():
        config_dict = json.loads((ROOT / "config.json").read_text())
        config_dict["text_config"].update(overrides.pop("text_config", {}))
        config_dict.update(overrides)
        config = classes.Config(**{k: v for k, v in config_dict.items() if k not in ("auto_map", "architectures")})
        with torch.device("meta"):
            models[name] = classes.ForConditionalGeneration(config)
    return models


@suite("quantized-memory")
def quantized_memory_suite(args) -> dict:
    """Weight memory of InternVL-X-2B and -8B (PVTC + LVTC as in config.json) in bf16 and quantized, computed from
    parameter counts (meta device) and bits, not measured: every Linear but the LM head quantized (what Transformers
    does with each library here, tests/test_quantization.py), the rest kept in bf16. int8 stores a byte per weight and
    a 4-byte scale per output row (bitsandbytes' LLM.int8, torchao and quanto int8 weight-only alike); NF4 half a byte
    and a 4-byte absmax per block of 64."""
    rows = []
    for name, model in paper_models().items():
        linear_weights = sum(
            m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
        )
        linear_rows = sum(
            m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
        )
        total = sum(p.numel() for p in model.parameters())
        rest = total - linear_weights
        schemes = {
            "bf16": 2 * total,
            "int8 weights": linear_weights + 4 * linear_rows + 2 * rest,
            "NF4 weights": linear_weights * (0.5 + 4 / 64) + 2 * rest,
        }
        for scheme, size in schemes.items():
            rows.append(
                {
                    "model": name,
                    "parameters (B)": total / 1e9,
                    "weights": scheme,
                    "GB": size / 1e9,
                    "of bf16": size / schemes["bf16"],
                }
            )
    ratios = {f"{r['model']} {r['weights']} / bf16": r["of bf16"] for r in rows if r["weights"] != "bf16"}
    return {"rows": rows, "ratios": ratios, "shapes": {"computed": "from parameter counts and bits, not measured"}}


# Bytes per parameter of mixed-precision AdamW training (the ZeRO paper's accounting): bf16 weights (2) and
# gradients (2), and the optimizer's fp32 master weights, first and second moments (4 + 4 + 4).
WEIGHT_BYTES, GRADIENT_BYTES, OPTIMIZER_BYTES = 2, 2, 12


@suite("zero-memory")
def zero_memory_suite(args) -> dict:
    """Memory per GPU for full fine-tuning of InternVL-X-2B and -8B with bf16 AdamW under DDP, ZeRO-2, ZeRO-3 and
    ZeRO-3 with the optimizer on the CPU (examples/ds_zero*.json), on 8 GPUs: an estimate computed from the
    parameter count and the bytes each strategy keeps per parameter, not measured. Activations (batch, sequence
    length and tiles; gradient checkpointing), the CUDA context and DeepSpeed's buffers come on top."""
    gpus = 8
    rows = []
    for name, model in paper_models().items():
        psi = sum(p.numel() for p in model.parameters())
        states = WEIGHT_BYTES + GRADIENT_BYTES + OPTIMIZER_BYTES
        strategies = {
            "DDP": (states * psi, 0),
            "ZeRO-2 (examples/ds_zero2.json)": ((WEIGHT_BYTES + (GRADIENT_BYTES + OPTIMIZER_BYTES) / gpus) * psi, 0),
            "ZeRO-3 (examples/ds_zero3.json)": (states * psi / gpus, 0),
            "ZeRO-3, optimizer on CPU (examples/ds_zero3_offload.json)": (
                (WEIGHT_BYTES + GRADIENT_BYTES) * psi / gpus,
                OPTIMIZER_BYTES * psi / gpus,
            ),
        }
        for strategy, (gpu, cpu) in strategies.items():
            rows.append(
                {
                    "model": name,
                    "parameters (B)": psi / 1e9,
                    "strategy": strategy,
                    "GPUs": gpus,
                    "GB per GPU": gpu / 1e9,
                    "CPU GB per GPU": cpu / 1e9,
                }
            )
    ratios = {
        f"{r['model']} {r['strategy'].split(' (')[0]} / DDP": r["GB per GPU"] / rows[4 * (i // 4)]["GB per GPU"]
        for i, r in enumerate(rows)
        if not r["strategy"].startswith("DDP")
    }
    shapes = {
        "computed": "estimate from parameter count × bytes per parameter, not measured",
        "gpus": gpus,
        "bytes per parameter": {
            "weights": WEIGHT_BYTES,
            "gradients": GRADIENT_BYTES,
            "AdamW states (fp32 master, m, v)": OPTIMIZER_BYTES,
        },
    }
    return {"rows": rows, "ratios": ratios, "shapes": shapes}
