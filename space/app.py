"""InternVL-X in the browser: a Gradio app laid out as a Hugging Face Space.

    python space/app.py [--model PATH_OR_HUB_ID] [--device cpu|cuda] [--port 7860]

Chat with images and videos (uploads, the webcam, the demo's examples), the answer streamed with a stop button,
several turns. Beside the chat, what the compressors did for this request, measured on it: the tiles the image was cut
into (RVTC's `area` and `edge` rules against InternVL's `ratio` rule, drawn over the image), the tokens each decoder
layer held (recorded from the layers during the prefill: LVTC's growth at layer k, FastV's cut), the time to the first
token, the time per new token, and the positions used. LVTC can be switched off on a checkpoint that has it, FastV on
any; the numbers change with them.

The model is the checkpoint's own (`AutoModelForImageTextToText`, `trust_remote_code`): the digits demo by default
(offline), or any local folder or Hub id (`--model`, or `INTERNVL_X_MODEL`). Uploads are taken in as the server takes
requests (`serving_internvl_x.Intake` under `MediaPolicy.for_servers`: bytes, pixels, decoded frames and positions
bounded before the model sees them; no local paths, no URLs); a refusal is shown in the page, never a traceback.
"""

import argparse
import base64
import io
import mimetypes
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import AutoModelForImageTextToText, AutoProcessor, StoppingCriteria, StoppingCriteriaList
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.generation.streamers import BaseStreamer

HERE = Path(__file__).resolve().parent
# The digits demo: beside this file in a Space (copied there), or in the repository this file comes from.
DEMO = next((p for p in (HERE / "digits-demo", HERE.parent / "examples" / "digits-demo") if p.exists()), None)
SLICINGS = ("ratio", "area", "edge")
COLORS = {"ratio": (230, 60, 60), "area": (40, 150, 60), "edge": (40, 90, 220)}


@dataclass
class Reply:
    """What one answer measured: the text so far, the tokens each decoder layer held during the prefill, the times."""

    text: str = ""
    new_tokens: int = 0
    layer_tokens: list[int] = field(default_factory=list)
    text_tokens: int = 0
    positions: int = 0
    tiles: int = 0
    prefill_s: float | None = None
    decode_s_per_token: float | None = None
    stopped: bool = False


class TokenClock(BaseStreamer):
    """Receives `generate`'s tokens as they come (the prompt first), timing each, and hands them to the page."""

    def __init__(self):
        self.tokens: queue.Queue = queue.Queue()
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.put(value.flatten().tolist())

    def end(self) -> None:
        self.tokens.put(None)


class StopFlag(StoppingCriteria):
    """Ends generation at the next token once the page's stop button set it."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Demo:
    """The checkpoint, its processor and the server's intake, and one answer at a time."""

    def __init__(self, model: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.name, self.device = str(model), device
        media_policy_class = get_class_from_dynamic_module("media_internvl_x.MediaPolicy", model)
        intake_class = get_class_from_dynamic_module("serving_internvl_x.Intake", model)
        limits_class = get_class_from_dynamic_module("serving_internvl_x.ServingLimits", model)
        self.message_parts = get_class_from_dynamic_module("serving_internvl_x.message_parts", model)
        # Uploads only: no local paths and no URLs reach the processor (the app's process takes the policy too: main).
        self.policy = media_policy_class.for_servers(remote_urls=False)
        self.limits = limits_class()
        self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
        self.model = AutoModelForImageTextToText.from_pretrained(model, trust_remote_code=True, dtype=dtype)
        self.model.to(device).eval()
        config = self.model.config
        self.has_lvtc = bool(config.lvtc_enabled)
        self.layers = config.text_config.num_hidden_layers
        self.intake = intake_class(config, self.processor.image_processor, self.policy, self.limits)
        self.stop_flag = StopFlag()
        self.lock = threading.Lock()

    # ---- settings ----------------------------------------------------------------------------------------------------
    def use_variant(self, lvtc: bool, fastv_ratio: float, fastv_layer: int) -> str:
        """Switch LVTC (on a checkpoint that has it) and FastV (R = 0: off) on the loaded model; its token schedule is
        built again from the config. Returns the variant's name."""
        config = self.model.config
        config.lvtc_enabled = bool(lvtc) and self.has_lvtc
        if fastv_ratio > 0:
            config.fastv_layer, config.fastv_ratio = int(fastv_layer), float(fastv_ratio)
        else:
            config.fastv_layer = None
        config.validate()
        schedule = self.model.model.token_schedule
        return "plain" if schedule is None else f"{schedule.name} ({schedule.layer_change})"

    # ---- a turn ------------------------------------------------------------------------------------------------------
    def user_turn(self, text: str, files: list[str]) -> dict:
        """A user message in Transformers' chat format, each uploaded file as a data URI (read up to the policy's byte
        cap; the intake checks the rest)."""
        content = []
        for index, path in enumerate(files):
            kind = "video" if (mimetypes.guess_type(path)[0] or "").startswith("video") else "image"
            with open(path, "rb") as file:
                data = file.read(self.policy.max_bytes + 1)
            if len(data) > self.policy.max_bytes:
                raise ValueError(f"upload {index + 1} is larger than the {self.policy.max_bytes} bytes allowed.")
            mime = mimetypes.guess_type(path)[0] or ("video/mp4" if kind == "video" else "image/png")
            content.append({"type": kind, "url": f"data:{mime};base64," + base64.b64encode(data).decode()})
        if text:
            content.append({"type": "text", "text": text})
        if not content:
            raise ValueError("the message is empty: type a question or add an image or video.")
        return {"role": "user", "content": content}

    def inputs(self, conversation: list[dict]):
        """The model's inputs for `conversation` after the intake took every image and video in (in place)."""
        self.intake.admit(self.message_parts(conversation))
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        images, videos = [], []
        for message in conversation:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part["type"] == "image":
                    images.append(part["url"])
                elif part["type"] == "video":
                    videos.append(part["url"])
        return self.processor(text=text, images=images or None, videos=videos or None, return_tensors="pt")

    def answer(self, conversation: list[dict], max_new_tokens: int):
        """Yields `Reply`s as the answer grows: the prompt read, each new token, the end."""
        with self.lock:
            inputs = self.inputs(conversation).to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            reply = Reply(tiles=int(inputs["num_patches"].sum()) if "num_patches" in inputs else 0)
            ids = inputs["input_ids"]
            reply.text_tokens = int((ids != self.model.config.image_token_id).sum())
            reply.positions = int(self.model.model.positions_needed(ids, inputs["attention_mask"]))
            recorded: list[int] = []

            def record(module, args, kwargs):
                hidden_states = args[0] if args else kwargs["hidden_states"]
                recorded.append(hidden_states.shape[1])

            layers = self.model.model.language_model.layers
            hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
            clock, self.stop_flag.event = TokenClock(), threading.Event()
            settings = dict(
                max_new_tokens=max_new_tokens,
                do_sample=False,
                streamer=clock,
                stopping_criteria=StoppingCriteriaList([self.stop_flag]),
            )
            errors: list[BaseException] = []

            def run():
                try:
                    with torch.no_grad():
                        self.model.generate(**inputs, **settings)
                except BaseException as error:  # noqa: BLE001 (shown in the page)
                    errors.append(error)
                    clock.end()

            start = time.perf_counter()
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            tokens: list[int] = []
            try:
                while (new := clock.tokens.get()) is not None:
                    if not reply.layer_tokens:
                        reply.layer_tokens = recorded[: self.layers]
                        reply.prefill_s = clock.times[0] - start
                    tokens += new
                    reply.text = self.processor.decode(tokens, skip_special_tokens=True)
                    reply.new_tokens = len(tokens)
                    if len(clock.times) > 1:
                        reply.decode_s_per_token = (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)
                    yield reply
            finally:
                worker.join()
                for hook in hooks:
                    hook.remove()
            if errors:
                raise errors[0]
            reply.stopped = self.stop_flag.event.is_set()
            reply.positions += reply.new_tokens
            yield reply

    def stop(self) -> None:
        self.stop_flag.event.set()

    # ---- what the compressors did ------------------------------------------------------------------------------------
    def tile_overlay(self, image: Image.Image) -> Image.Image:
        """The image three times, each with the tile grid one slicing rule gives it (InternVL's `ratio`, RVTC's `area`
        and `edge`), the checkpoint's own rule marked, and the tile counts (the thumbnail added after several)."""
        processor = self.processor.image_processor
        font = ImageFont.load_default(size=14)
        width, height = image.size
        scale = 256 / max(width, height)
        shown = image.convert("RGB").resize((max(1, round(width * scale)), max(1, round(height * scale))))
        panels = []
        for slicing in SLICINGS:
            columns, rows = processor.get_tile_grid(height, width, {"slicing": slicing})
            tiles = columns * rows + int(processor.use_thumbnail and columns * rows > 1)
            panel = Image.new("RGB", (shown.width + 8, shown.height + 30), "white")
            panel.paste(shown, (4, 26))
            draw = ImageDraw.Draw(panel)
            color = COLORS[slicing]
            for c in range(columns + 1):
                x = 4 + round(c * (shown.width - 1) / columns)
                draw.line([(x, 26), (x, 26 + shown.height - 1)], fill=color, width=2)
            for r in range(rows + 1):
                y = 26 + round(r * (shown.height - 1) / rows)
                draw.line([(4, y), (4 + shown.width - 1, y)], fill=color, width=2)
            own = " (this checkpoint)" if slicing == processor.slicing else ""
            draw.text((4, 5), f"{slicing}: {columns}×{rows}, {tiles} tiles{own}", fill=color, font=font)
            panels.append(panel)
        sheet = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
        x = 0
        for panel in panels:
            sheet.paste(panel, (x, 0))
            x += panel.width
        return sheet

    def last_image_overlay(self, turn: dict) -> Image.Image | None:
        """`tile_overlay` of the turn's last image (taken in by the intake already), or None without one."""
        images = [part["url"] for part in turn["content"] if part["type"] == "image"]
        if not images:
            return None
        return self.tile_overlay(Image.open(io.BytesIO(base64.b64decode(images[-1].split(",", 1)[1]))))

    def tokens_plot(self, reply: Reply, variant: str):
        """Visual tokens each decoder layer held during this prefill (measured), against the plain model's."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(5, 3.2), dpi=100)
        layers = list(range(len(reply.layer_tokens)))
        visual = [count - reply.text_tokens for count in reply.layer_tokens]
        plain = reply.tiles * self.model.config.tokens_per_tile
        axes.step(layers, visual, where="mid", label="this request", color="tab:blue", linewidth=2)
        axes.axhline(plain, color="gray", linestyle="--", label=f"plain model ({plain})")
        axes.set_xticks(layers)
        axes.set_xlabel("decoder layer")
        axes.set_ylabel("visual tokens")
        axes.set_ylim(bottom=0, top=max(visual + [plain]) * 1.15)
        axes.set_title(variant, fontsize=9)
        axes.legend(loc="lower right", fontsize=8)
        figure.tight_layout()
        plt.close(figure)
        return figure


def numbers(reply: Reply, variant: str) -> str:
    """The request's measured figures, as a markdown table."""
    prefill = "—" if reply.prefill_s is None else f"{reply.prefill_s * 1000:.0f} ms"
    decode = "—" if reply.decode_s_per_token is None else f"{reply.decode_s_per_token * 1000:.1f} ms"
    rows = [
        ("variant", variant),
        ("tiles", reply.tiles),
        ("time to first token (vision and prefill)", prefill),
        ("time per new token", decode),
        ("new tokens", reply.new_tokens),
        ("positions used (prompt, as the schedule counts them, and new tokens)", reply.positions),
    ]
    if reply.stopped:
        rows.append(("stopped", "by the stop button"))
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def refusal(error: BaseException) -> str:
    """A refusal as the page shows it: the model's or the intake's message; anything else by its kind."""
    if isinstance(error, ValueError):
        return f"**Refused:** {error}"
    return f"**Failed:** {type(error).__name__}: {error}"


def build(demo: Demo):
    """The page."""
    import gradio as gr

    examples = []
    if DEMO is not None and Path(demo.name).resolve() == DEMO.resolve():
        import json

        for example in json.loads((DEMO / "examples.json").read_text()):
            examples.append({"text": example["question"], "files": [str(DEMO / example["image"])]})

    def add_user(message: dict, webcam, chat: list, conversation: list):
        files = list(message.get("files") or []) + ([webcam] if webcam else [])
        try:
            turn = demo.user_turn((message.get("text") or "").strip(), files)
        except (ValueError, OSError) as error:
            return gr.update(), None, chat, conversation, refusal(error), False
        shown = [{"role": "user", "content": {"path": path}} for path in files]
        if message.get("text"):
            shown.append({"role": "user", "content": message["text"]})
        return None, None, chat + shown, conversation + [turn], "Reading the images and videos…", True

    def respond(
        chat: list, conversation: list, ok: bool, lvtc: bool, fastv_ratio: float, fastv_layer: int, max_new_tokens: int
    ):
        if not ok:
            yield chat, conversation, gr.update(), gr.update(), gr.update(), gr.update()
            return
        try:
            variant = demo.use_variant(lvtc, fastv_ratio, fastv_layer)
            overlay = reply = None
            for reply in demo.answer(conversation, int(max_new_tokens)):
                if overlay is None:  # the intake has taken the images in by now
                    overlay = demo.last_image_overlay(conversation[-1])
                shown = chat + [{"role": "assistant", "content": reply.text}]
                yield shown, conversation, overlay, gr.update(), numbers(reply, variant), "Answering…"
            answer = {"role": "assistant", "content": [{"type": "text", "text": reply.text}]}
            plot = demo.tokens_plot(reply, variant) if reply.layer_tokens else None
            status = "Stopped." if reply.stopped else "Done."
            yield (
                chat + [{"role": "assistant", "content": reply.text}],
                conversation + [answer],
                overlay,
                plot,
                numbers(reply, variant),
                status,
            )
        except Exception as error:  # noqa: BLE001 (shown in the page, never as a traceback)
            yield chat, conversation[:-1], gr.update(), gr.update(), gr.update(), refusal(error)

    with gr.Blocks(title="InternVL-X") as page:
        gr.Markdown(
            f"# InternVL-X\nCheckpoint: `{demo.name}` · device: `{demo.device}` · "
            f"{'LVTC' if demo.has_lvtc else 'no LVTC'} · {demo.layers} decoder layers"
        )
        conversation, ok = gr.State([]), gr.State(False)
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Chat", height=420, elem_id="chat")
                box = gr.MultimodalTextbox(
                    label="Message",
                    placeholder="Ask about an image or a video…",
                    file_types=["image", "video"],
                    file_count="multiple",
                    sources=["upload"],
                    elem_id="box",
                )
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="stop")
                    clear = gr.Button("New chat", elem_id="clear")
                with gr.Accordion("Webcam", open=False):
                    webcam = gr.Image(
                        sources=["webcam"],
                        type="filepath",
                        label="A photo (added to the next message)",
                        elem_id="webcam",
                    )
                if examples:
                    gr.Examples(examples=examples, inputs=box, label="The digits demo")
            with gr.Column(scale=2):
                lvtc = gr.Checkbox(
                    value=demo.has_lvtc,
                    interactive=demo.has_lvtc,
                    label="LVTC" if demo.has_lvtc else "LVTC (this checkpoint has none)",
                    elem_id="lvtc",
                )
                fastv_ratio = gr.Slider(0, 0.9, value=0, step=0.05, label="FastV ratio R (0: off)", elem_id="fastv")
                fastv_layer = gr.Slider(
                    1, max(1, demo.layers - 1), value=min(2, demo.layers - 1), step=1, label="FastV layer K"
                )
                max_new_tokens = gr.Slider(1, 256, value=32, step=1, label="new tokens at most")
                status = gr.Markdown(elem_id="status")
                overlay = gr.Image(label="Tiles (InternVL's ratio rule, RVTC's area and edge)", elem_id="overlay")
                plot = gr.Plot(label="Visual tokens per decoder layer (measured)", elem_id="plot")
                figures = gr.Markdown(elem_id="numbers")

        submitted = box.submit(
            add_user, [box, webcam, chat, conversation], [box, webcam, chat, conversation, status, ok]
        ).then(
            respond,
            [chat, conversation, ok, lvtc, fastv_ratio, fastv_layer, max_new_tokens],
            [chat, conversation, overlay, plot, figures, status],
        )
        stop.click(demo.stop, None, None, queue=False)
        clear.click(
            lambda: ([], [], None, None, "", ""),
            None,
            [chat, conversation, overlay, plot, figures, status],
            cancels=[submitted],
        )
    return page


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("INTERNVL_X_MODEL") or (str(DEMO) if DEMO else None))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("no checkpoint: pass --model PATH_OR_HUB_ID or set INTERNVL_X_MODEL")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    demo = Demo(args.model, args.device, dtype)
    os.environ.update(demo.policy.to_environment())  # for every reader of media in this process, not just the intake
    page = build(demo)
    page.queue(default_concurrency_limit=1, max_size=16)
    page.launch(server_name=args.host, server_port=args.port, max_file_size=demo.policy.max_bytes)


if __name__ == "__main__":
    main()
