"""The paper's Fig. 4 on trained digits models: where the text looks in the image, layer by layer.

    python examples/attention_analysis.py examples/digits-demo /tmp/digits/hr_only-0 \\
        --out benchmarks/results/attention-digits.png

The paper (§3.2) reports that in InternVL the early LLM layers attend locally and only the deep layers spread their
attention over the image, while FastV found the opposite in LLaVA (most visual tokens matter early). This script
measures that on checkpoints of this bundle. Each model reads the same held-out questions (one prompt at a time, no
padding) with eager attention; a forward hook on every layer's attention keeps its weights, averaged over heads. For
the text tokens after the image (the question and the assistant header) as queries, per layer:

- `visual share`: the share of their attention that goes to visual tokens at all;
- `distance into the image`: where that visual attention lands, as the attention-weighted mean of each visual
  token's distance from the image's end, over the length of the visual span (0: the visual tokens next to the text,
  0.5: spread evenly over the image, 1: the first visual token);
- `active visual tokens`: the share of visual tokens whose attention from those queries, averaged over them,
  is above `--threshold` × the uniform share (1 / the number of tokens each query sees).

With LVTC the layers from k on run on the expanded sequence: their visual tokens are the N2² per tile. A JSON file
beside the PNG holds the numbers.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.train_digits_demo import chat_inputs, held_out, load_checkpoint  # noqa: E402


class AttentionRecorder:
    """Forward hooks on the language model's attention modules that keep each layer's weights `(q, kv)`, averaged
    over heads, of a batch of one (eager attention returns them with the output)."""

    def __init__(self, model):
        self.weights: dict[int, torch.Tensor] = {}
        layers = model.model.language_model.layers
        self.handles = [layer.self_attn.register_forward_hook(self.keeper(i)) for i, layer in enumerate(layers)]

    def keeper(self, index: int):
        def keep(module, inputs, output):
            self.weights[index] = output[1][0].float().mean(0)

        return keep

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def layer_masks(model, input_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(visual, text queries)` bool masks `(length,)` of one prompt in the layout a layer sees: the input layout, or
    LVTC's expanded one (each N1² tile span in place replaced by N2² tokens) when `length` is longer."""
    config = model.config
    visual = input_ids == config.image_token_id
    after_image = torch.zeros_like(visual)
    end = (input_ids == config.image_end_token_id).nonzero()
    after_image[int(end[-1]) + 1 :] = True
    if length != input_ids.shape[0]:
        growth = config.lvtc_expanded_tokens_per_tile // config.tokens_per_tile
        repeats = torch.where(visual, growth, 1)
        visual, after_image = visual.repeat_interleave(repeats), after_image.repeat_interleave(repeats)
    if visual.shape[0] != length:
        raise ValueError(f"a layer saw {length} tokens but the prompt's layout has {visual.shape[0]}")
    return visual, after_image


def layer_statistics(weights: torch.Tensor, visual: torch.Tensor, queries: torch.Tensor, threshold: float) -> dict:
    """Statistics of one layer's head-averaged `weights (L, L)` for the text `queries` against the `visual` keys."""
    rows = weights[queries][:, visual]  # (text queries, visual tokens)
    count = int(visual.sum())
    to_image = rows.sum(1)
    distance = torch.arange(count - 1, -1, -1, dtype=torch.float32) / max(count - 1, 1)
    keys_seen = queries.nonzero()[:, 0].float() + 1  # causal, no padding: query i sees i + 1 tokens
    relative = (rows * keys_seen[:, None]).mean(0)  # 1 = a uniform share
    return {
        "visual_share": float(to_image.mean()),
        "distance_into_image": float(((rows @ distance) / to_image.clamp_min(1e-12)).mean()),
        "active_visual_tokens": float((relative > threshold).float().mean()),
        "visual_tokens": count,
    }


def analyse(folder: Path, samples: list[dict], threshold: float) -> dict:
    model, processor = load_checkpoint(folder, attn_implementation="eager")  # eager returns the weights
    recorder = AttentionRecorder(model)
    per_layer: list[list[dict]] = []
    try:
        for sample in samples:
            inputs = chat_inputs(processor, [sample])
            with torch.no_grad():
                model(**inputs, use_cache=False)
            for index, weights in sorted(recorder.weights.items()):
                visual, queries = layer_masks(model, inputs["input_ids"][0], weights.shape[-1])
                if len(per_layer) <= index:
                    per_layer.append([])
                per_layer[index].append(layer_statistics(weights, visual, queries, threshold))
    finally:
        recorder.remove()
    layers = [{key: sum(s[key] for s in stats) / len(stats) for key in stats[0]} for stats in per_layer]
    config = model.config
    metrics_file = folder / "metrics.json"  # written by train_digits_demo.py: variant and training budget
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    label = metrics.get("variant", folder.name)
    if "steps" in metrics:
        samples = (metrics["steps"] + metrics.get("curriculum_steps", 0)) * metrics["batch_size"]
        label += f", trained on {samples / 1000:.0f}k samples"
    return {
        "model": str(folder),
        "label": label,
        "lvtc_expand_layer": config.lvtc_expand_layer if config.lvtc_enabled else None,
        "visual_tokens_per_tile": model.model.visual_token_schedule(1),
        "layers": layers,
    }


def plot(results: list[dict], out: Path, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("visual_share", "attention of the text to visual tokens"),
        ("distance_into_image", "distance into the image (0 = next to the text)"),
        ("active_visual_tokens", f"visual tokens above {threshold:g}× uniform attention"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for axis, (key, title) in zip(axes, panels):
        for result in results:
            tokens = result["visual_tokens_per_tile"]
            per_tile = f"{tokens[0]}→{tokens[-1]}" if tokens[0] != tokens[-1] else str(tokens[0])
            line = axis.plot(
                range(len(result["layers"])),
                [layer[key] for layer in result["layers"]],
                marker="o",
                label=f"{result['label']} ({per_tile} visual tokens per tile)",
            )
            if result["lvtc_expand_layer"] is not None:
                axis.axvline(result["lvtc_expand_layer"] - 0.5, color=line[0].get_color(), linestyle=":", alpha=0.6)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("language-model layer")
        axis.set_xticks(range(max(len(result["layers"]) for result in results)))
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(results), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(out, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="checkpoint folders of this bundle")
    parser.add_argument("--samples", type=int, default=60, help="held-out questions (the same for every model)")
    parser.add_argument("--threshold", type=float, default=1.0, help="'active': above this × the uniform share")
    parser.add_argument("--out", type=Path, required=True, help="the PNG; the numbers go beside it as .json")
    args = parser.parse_args(argv)
    samples = held_out(args.samples)
    results = [analyse(folder, samples, args.threshold) for folder in args.models]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.out, args.threshold)
    report = {"settings": {"samples": args.samples, "threshold": args.threshold}, "models": results}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    for result in results:
        print(result["label"])
        for index, layer in enumerate(result["layers"]):
            print(f"  layer {index}: " + ", ".join(f"{k} {v:.3f}" for k, v in layer.items()))


if __name__ == "__main__":
    main()
