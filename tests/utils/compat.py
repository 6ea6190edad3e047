"""How the installed Transformers names what the tests pass and read (the tests call it the way its users do)."""

import transformers
from packaging.version import Version
from transformers import TrainingArguments

TRANSFORMERS = Version(transformers.__version__)
# Transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`.
CACHE = "cache" if TRANSFORMERS >= Version("5.24.0.dev0") else "past_key_values"
# Transformers 5.23 renamed gradient checkpointing to activation checkpointing (the old names warn).
CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def with_cache(cache) -> dict:
    """`{name: cache}` for a forward or `generate` call."""
    return {CACHE: cache}


def cache_of(output):
    """The cache a model or `generate` output carries."""
    return getattr(output, CACHE)


def enable_checkpointing(model) -> None:
    """Non-reentrant gradient (activation) checkpointing, under the installed release's method name."""
    getattr(model, f"{CHECKPOINTING}_enable")(**{f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}})
