"""`make test-compat`: the `compat`-marked tests on every Transformers minor release, resolved when it runs.

The releases are read from the package index each time (`pip index versions transformers --pre`): the newest patch of
every minor from the oldest supported one (`requirements-min.txt`) to the newest release, and the newest pre-release
when it is newer than that release, less the two the whole suite runs on (`make test-min` on the oldest, `make test` on
the one `requirements-lock.txt` pins). So a release that appeared since the last run is tested the first time CI runs
after it. Each version is installed with its own dependencies into `.venv-compat/VERSION` (a `pip --target` folder put
in front of the main virtualenv on `PYTHONPATH`, so torch is shared) and kept for later runs.

A release may need a dependency the package index cannot give (Transformers 5.25 requires `kernels>=0.19.1`, which this
index lacked until December 2026). Then the release is installed alone over the main virtualenv's packages, the subset
runs with what the missing dependency calls for (`MISSING_DEPENDENCY_SETTINGS`: hub kernels off without `kernels`), and
its table row says so. A release that installs and fails its tests fails the run either way.

    python devtools/compat_matrix.py            # resolve, install what is missing, run, print the table
    python devtools/compat_matrix.py --list     # only print the versions it would test
"""

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SITES = ROOT / ".venv-compat"


def oldest_supported() -> Version:
    """The Transformers release `requirements-min.txt` pins: the oldest this bundle supports."""
    pins = re.findall(r"^transformers==(\S+)", (ROOT / "requirements-min.txt").read_text(), flags=re.MULTILINE)
    if len(pins) != 1:
        raise SystemExit(f"requirements-min.txt must pin transformers==X exactly once, found {pins}")
    return Version(pins[0])


def locked() -> Version:
    """The Transformers release `requirements-lock.txt` pins: the one `make test` runs the whole suite on."""
    pins = re.findall(r"^transformers==(\S+)", (ROOT / "requirements-lock.txt").read_text(), flags=re.MULTILINE)
    if len(pins) != 1:
        raise SystemExit(f"requirements-lock.txt must pin transformers==X exactly once, found {pins}")
    return Version(pins[0])


def published_versions() -> list[Version]:
    """Every Transformers version on the package index, pre-releases included."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "transformers", "--pre"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    listing = re.search(r"^Available versions: (.+)$", result.stdout, flags=re.MULTILINE)
    if result.returncode or listing is None:
        raise SystemExit(f"could not read Transformers' versions from the package index:\n{result.stderr}")
    return [Version(v.strip()) for v in listing.group(1).split(",")]


def versions_to_test(
    published: list[Version], oldest: Version, whole_suite: set[Version] = frozenset()
) -> list[Version]:
    """The newest patch of every minor from `oldest` to the newest release, then the newest pre-release if it is
    newer than that release; less the versions in `whole_suite` (the whole suite runs on them elsewhere)."""
    releases = [v for v in published if not v.is_prerelease and not v.is_devrelease and v >= oldest]
    if not releases:
        raise SystemExit(f"the package index lists no Transformers release at or after {oldest}")
    newest_by_minor: dict[tuple[int, int], Version] = {}
    for version in releases:
        minor = (version.major, version.minor)
        newest_by_minor[minor] = max(version, newest_by_minor.get(minor, version))
    chosen = sorted(newest_by_minor.values())
    previews = [v for v in published if v.is_prerelease and not v.is_devrelease and v > chosen[-1]]
    return [v for v in chosen + ([max(previews)] if previews else []) if v not in whole_suite]


# What the subset needs when a dependency of the release is missing, and how the table says it: a dependency's name,
# the environment it runs with and the words for the row.
MISSING_DEPENDENCY_SETTINGS = {"kernels": ({"USE_HUB_KERNELS": "0"}, "hub kernels off")}


@dataclass
class Installed:
    """A release installed in `site`, how (`note`, for the table) and the environment its tests run with."""

    site: Path
    note: str = "with its dependencies"
    env: dict[str, str] = field(default_factory=dict)


def unresolvable_dependency(pip_output: str) -> str | None:
    """The dependency pip could not find for Transformers (`kernels<0.20,>=0.19.1`), or None when the failure was
    anything else (Transformers itself missing, a network error)."""
    found = re.search(r"No matching distribution found for (\S+) \(from transformers", pip_output)
    return found.group(1) if found else None


def unmet_requirements(site: Path) -> list[Requirement]:
    """The installed release's own requirements (no extras) that neither `site` nor this interpreter's packages meet."""
    paths = [str(site), *sys.path]
    release = next(importlib.metadata.distributions(name="transformers", path=[str(site)]))
    unmet = []
    for line in release.requires or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        found = next(importlib.metadata.distributions(name=requirement.name, path=paths), None)
        if found is None or not requirement.specifier.contains(found.version, prereleases=True):
            unmet.append(requirement)
    return unmet


def install(version: Version, pip_options: tuple[str, ...] = ()) -> Installed:
    """Install `transformers==version` into `.venv-compat/VERSION` with its dependencies; where the index cannot
    resolve one, install the release alone over this interpreter's packages and say which are missing. Kept for later
    runs (the marker file records how it was installed)."""
    site = SITES / str(version)
    marker = site / ".installed"
    if marker.exists():
        recorded = json.loads(marker.read_text() or "{}")
        return Installed(site, recorded.get("note", "with its dependencies"), recorded.get("env", {}))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site), "--upgrade", *pip_options]
    result = subprocess.run([*pip, f"transformers=={version}"], capture_output=True, text=True)
    installed = Installed(site)
    if result.returncode:
        missing = unresolvable_dependency(result.stdout + result.stderr)
        if missing is None:
            raise SystemExit(f"could not install Transformers {version}:\n{result.stdout}\n{result.stderr}")
        shutil.rmtree(site, ignore_errors=True)
        subprocess.run([*pip, "--no-deps", f"transformers=={version}"], check=True)
        unmet = unmet_requirements(site)
        notes = []
        for requirement in unmet:
            env, note = MISSING_DEPENDENCY_SETTINGS.get(requirement.name, ({}, ""))
            installed.env.update(env)
            notes.append(note)
        unmet_text = ", ".join(f"{r.name}{r.specifier}" for r in unmet) or missing
        installed.note = "; ".join(filter(None, [f"dependencies unresolvable here: {unmet_text}", *notes]))
    marker.write_text(json.dumps({"note": installed.note, "env": installed.env}))
    return installed


def run_subset(installed: Installed) -> tuple[bool, str]:
    path = os.pathsep.join(filter(None, [str(installed.site), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, **installed.env)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "compat", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
    if result.returncode:
        print(result.stdout[-6000:], result.stderr[-2000:], sep="\n")
    return result.returncode == 0, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the versions and stop")
    args = parser.parse_args()
    whole_suite = {oldest_supported(), locked()}
    versions = versions_to_test(published_versions(), oldest_supported(), whole_suite)
    print("Transformers versions to test:", ", ".join(map(str, versions)), flush=True)
    print("(the whole suite runs on", " and ".join(map(str, sorted(whole_suite))), "in make test-min and make test)")
    if args.list:
        return
    rows, failed = [], []
    for version in versions:
        start = time.monotonic()
        installed = install(version)
        ready = time.monotonic()
        ok, summary = run_subset(installed)
        rows.append(
            f"| {version} | {'pass' if ok else 'FAIL'} | {summary} | {installed.note} | {ready - start:.0f} | "
            f"{time.monotonic() - ready:.0f} |"
        )
        print(rows[-1], flush=True)
        if not ok:
            failed.append(str(version))
    print("\n| Transformers | result | tests | installed | install s | test s |\n| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if failed:
        raise SystemExit(f"the compat subset failed on Transformers {', '.join(failed)}")


if __name__ == "__main__":
    main()
