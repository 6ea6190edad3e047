"""Put Transformers' own common test mixins, for the installed Transformers, where the peer tests import them.

The mixins (`tests/test_modeling_common.py`, `test_configuration_common.py`, `test_image_processing_common.py`,
`test_processing_common.py`, ...) ship in Transformers' source distribution, not in its wheel. This downloads that sdist
from the package index (like any other dependency, at set-up time), and extracts its top-level `tests/*.py` into
`.peer/VERSION/transformers_tests/`, a package of its own (the mixins import each other relatively). Nothing of it is
committed here. Four modules that the mixins import are not in the sdist; each gets the smallest stub:

- `generation/test_utils.py`: `GenerationTesterMixin`, an empty class (the generation tests live in Transformers'
  repository only; this bundle's own suite tests `generate`);
- `exporters/test_export.py`: `ExportTesterMixin`, an empty class (same reason, for `torch.export`);
- `utils/test_configuration_utils.py` (imported by `test_configuration_common.py`): `config_common_kwargs`, an empty
  dict. `ConfigTester` reads it only for configs without sub-configs; InternVL-X's has two, so nothing changes;
- `utils/fetch_hub_objects_for_ci.py` beside the package (Transformers' repository script that the image-processing
  and processing mixins import to cache test images from the Hub): `url_to_local_path`, which returns the URL as
  given. Nothing here downloads; the tests that would read such an image are skipped, each saying so.

    python peer_tests/fetch_mixins.py      # prints the folder to put on sys.path
"""

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parents[1]
STUBS = {  # paths inside the mixin folder; the mixins' package is `transformers_tests`
    "transformers_tests/generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "transformers_tests/exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "transformers_tests/utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
    "utils/fetch_hub_objects_for_ci.py": "def url_to_local_path(url):\n    return url\n",
}


def mixin_folder(version: str = transformers.__version__) -> Path:
    return ROOT / ".peer" / version


def fetch(version: str = transformers.__version__) -> Path:
    folder = mixin_folder(version)
    package = folder / "transformers_tests"
    if (folder / ".complete").exists():
        return folder
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"transformers=={version}",
                "--dest",
                download,
            ],
            check=True,
        )
        (sdist,) = Path(download).glob("transformers-*.tar.gz")
        with tarfile.open(sdist) as archive:
            members = [
                m
                for m in archive.getmembers()
                if m.isfile()
                and len(Path(m.name).parts) == 3
                and Path(m.name).parts[1] == "tests"
                and m.name.endswith(".py")
            ]
            package.mkdir(parents=True, exist_ok=True)
            for member in members:
                (package / Path(member.name).name).write_bytes(archive.extractfile(member).read())
    (package / "__init__.py").touch()
    for name, text in STUBS.items():
        stub = folder / name
        if not stub.exists():
            stub.parent.mkdir(exist_ok=True)
            if stub.parent != folder / "utils":
                (stub.parent / "__init__.py").touch()
            stub.write_text(text)
    (folder / ".complete").touch()
    return folder


if __name__ == "__main__":
    print(fetch())
