"""`make test-compat`'s installer, on a package index the test writes itself: a release whose dependencies resolve is
installed with them; one that needs a package the index lacks is installed alone, its row says which package, and its
tests run with hub kernels off when that package is `kernels`; a release the index does not have stops the run."""

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

import devtools.compat_matrix as matrix


def write_wheel(index: Path, name: str, version: str, requires: list[str] = ()) -> None:
    """A pure-Python wheel of `name` with one empty module and these `Requires-Dist` lines."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": "".join(
            f"{line}\n"
            for line in ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
            + [f"Requires-Dist: {r}" for r in requires]
        ),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    records = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        records.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*records, f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(index / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A local index: Transformers 90.0 needs `helper` (listed), 91.0 needs `kernels>=90` (only 0.17.2 listed; no
    environment has such a release, so the requirement is unmet here too, whatever `kernels` this interpreter has)."""
    folder = tmp_path / "index"
    folder.mkdir()
    write_wheel(folder, "helper", "1.0")
    write_wheel(folder, "kernels", "0.17.2")
    write_wheel(folder, "transformers", "90.0", ["helper>=1"])
    write_wheel(folder, "transformers", "91.0", ["packaging>=20", "kernels>=90"])
    monkeypatch.setattr(matrix, "SITES", tmp_path / "sites")
    return ("--no-index", "--find-links", str(folder))


def installed_names(site: Path) -> set[str]:
    return {path.name.split("-")[0] for path in site.glob("*.dist-info")}


def test_a_release_whose_dependencies_resolve_is_installed_with_them(index):
    installed = matrix.install(Version("90.0"), index)
    assert installed_names(installed.site) == {"transformers", "helper"}
    assert installed.note == "with its dependencies" and installed.env == {}


def test_a_release_needing_what_the_index_lacks_is_installed_alone_and_says_so(index):
    installed = matrix.install(Version("91.0"), index)
    assert installed_names(installed.site) == {"transformers"}  # kernels 0.17.2 was not put in its place
    assert installed.note == "dependencies unresolvable here: kernels>=90; hub kernels off"
    assert installed.env == {"USE_HUB_KERNELS": "0"}
    # A later run reuses the folder and reports it the same way.
    assert matrix.install(Version("91.0"), index) == installed


def test_the_subset_runs_with_the_settings_the_install_chose(index, monkeypatch):
    seen = {}

    def run(command, cwd, env, capture_output, text):
        seen.update(env)
        return type("Result", (), {"returncode": 0, "stdout": "1 passed\n", "stderr": ""})()

    monkeypatch.setattr(matrix.subprocess, "run", run)
    assert matrix.run_subset(matrix.Installed(Path("site"), "", {"USE_HUB_KERNELS": "0"})) == (True, "1 passed")
    assert seen["USE_HUB_KERNELS"] == "0" and seen["PYTHONPATH"].startswith("site")


def test_a_release_the_index_does_not_have_stops_the_run(index):
    with pytest.raises(SystemExit, match="could not install Transformers 92.0"):
        matrix.install(Version("92.0"), index)


def test_only_a_missing_dependency_of_transformers_counts_as_unresolvable():
    assert (
        matrix.unresolvable_dependency(
            "ERROR: No matching distribution found for kernels<0.20,>=0.19.1 (from transformers)"
        )
        == "kernels<0.20,>=0.19.1"
    )
    assert matrix.unresolvable_dependency("ERROR: No matching distribution found for transformers==92.0") is None
