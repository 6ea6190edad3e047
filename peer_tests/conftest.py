"""Transformers' common test mixins for the installed Transformers (`fetch_mixins.py`), and the bundle's classes
loaded the way users load them (remote code from the repository folder)."""

import sys

from devtools.test_session import isolate_test_session

isolate_test_session()  # offline, quiet, a throw-away module cache: before Transformers is imported

from fetch_mixins import fetch  # noqa: E402  (this folder is on sys.path: pytest puts a conftest's folder there)

sys.path.insert(0, str(fetch()))  # the mixins fetched from Transformers' sdist, as `transformers_tests`

# The mixins decide what a class is (a base model, an image-text-to-text model, ...) by looking its name up in
# Transformers' model tables, which list native models only. Enter the bundle's two classes there, as they would be
# if InternVL-X shipped inside Transformers, so the mixins treat them as they treat native InternVL's.
from transformers.models.auto import modeling_auto  # noqa: E402

modeling_auto.MODEL_MAPPING_NAMES.setdefault("internvl_x", "InternVLXModel")
modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault("internvl_x", "InternVLXForConditionalGeneration")

# And in the Auto classes, as `AutoConfig.register` / `AutoModel.register` let any model be (some mixin tests look a
# config's base model up there).
from bundle import InternVLXConfig, InternVLXModel  # noqa: E402
from transformers import AutoConfig, AutoModel  # noqa: E402

AutoConfig.register("internvl_x", InternVLXConfig, exist_ok=True)
AutoModel.register(InternVLXConfig, InternVLXModel, exist_ok=True)

from bundle import InternVLXImageProcessor, InternVLXProcessor  # noqa: E402
from transformers import AutoImageProcessor, AutoProcessor  # noqa: E402

AutoImageProcessor.register(InternVLXConfig, InternVLXImageProcessor, exist_ok=True)
AutoProcessor.register(InternVLXConfig, InternVLXProcessor, exist_ok=True)
