"""`transformers serve`: requests per second and latency through the OpenAI client."""

import json
import time

from benchmarks.harness import suite
from devtools.bundle import ROOT


@suite("serve")
def serve_suite(args) -> dict:
    """Transformers' OpenAI-compatible server (`examples/serve.py`) on the digits checkpoint: requests per second
    answered for 1 client and for 8 concurrent clients (the `openai` client, base64 images, greedy, 20 tokens)."""
    import base64
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from examples.serve import running

    demo = ROOT / "examples" / "digits-demo"
    examples = json.loads((demo / "examples.json").read_text())
    requests_per_round = 8 if args.quick else 48

    def ask(client, example) -> bool:
        image = base64.b64encode((demo / example["image"]).read_bytes()).decode()
        content = [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": example["question"]},
        ]
        reply = client.chat.completions.create(
            model=str(demo.resolve()), max_tokens=20, temperature=0, messages=[{"role": "user", "content": content}]
        )
        return reply.choices[0].message.content.strip() == example["answer"]

    rows = []
    with running(demo, "--device", args.device) as base_url:
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        for example in examples:  # warm-up
            ask(client, example)
        for clients in (1, 8):
            work = [examples[i % len(examples)] for i in range(requests_per_round)]
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                correct = sum(pool.map(lambda example: ask(client, example), work))
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "clients": clients,
                    "requests": len(work),
                    "correct": correct,
                    "seconds": seconds,
                    "requests/s": len(work) / seconds,
                }
            )
    ratios = {
        "requests_per_s_8_clients": rows[1]["requests/s"],
        "requests_per_s_1_client": rows[0]["requests/s"],
        "8_clients_over_1": rows[1]["requests/s"] / rows[0]["requests/s"],
    }
    shapes = {"model": "examples/digits-demo", "max_tokens": 20, "images": "one 64-px PNG per request (base64)"}
    return {"rows": rows, "ratios": ratios, "shapes": shapes}
