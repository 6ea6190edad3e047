"""`make test-compat`: the `compat`-marked tests on every Transformers minor release, resolved when it runs.

The releases are read from the package index each time (`pip index versions transformers --pre`): the newest patch
of every minor from the oldest supported one (`requirements-min.txt`) to the newest release, and the newest
pre-release when it is newer than that release. So a release that appeared since the last run is tested the first time
CI runs after it. Each version is installed with its own dependencies into `.venv-compat/VERSION` (a `pip --target`
folder put in front of the main virtualenv on `PYTHONPATH`, so torch is shared) and kept for later runs.

    python tests/compat_matrix.py            # resolve, install what is missing, run, print the table
    python tests/compat_matrix.py --list     # only print the versions it would test
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SITES = ROOT / ".venv-compat"


def oldest_supported() -> Version:
    """The Transformers release `requirements-min.txt` pins: the oldest this bundle supports."""
    pins = re.findall(r"^transformers==(\S+)", (ROOT / "requirements-min.txt").read_text(), flags=re.MULTILINE)
    if len(pins) != 1:
        raise SystemExit(f"requirements-min.txt must pin transformers==X exactly once, found {pins}")
    return Version(pins[0])


def published_versions() -> list[Version]:
    """Every Transformers version on the package index, pre-releases included."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "transformers", "--pre"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    listing = re.search(r"^Available versions: (.+)$", result.stdout, flags=re.MULTILINE)
    if result.returncode or listing is None:
        raise SystemExit(f"could not read Transformers' versions from the package index:\n{result.stderr}")
    return [Version(v.strip()) for v in listing.group(1).split(",")]


def versions_to_test(published: list[Version], oldest: Version) -> list[Version]:
    """The newest patch of every minor from `oldest` to the newest release, then the newest pre-release if it is
    newer than that release."""
    releases = [v for v in published if not v.is_prerelease and not v.is_devrelease and v >= oldest]
    if not releases:
        raise SystemExit(f"the package index lists no Transformers release at or after {oldest}")
    newest_by_minor: dict[tuple[int, int], Version] = {}
    for version in releases:
        minor = (version.major, version.minor)
        newest_by_minor[minor] = max(version, newest_by_minor.get(minor, version))
    chosen = sorted(newest_by_minor.values())
    previews = [v for v in published if v.is_prerelease and not v.is_devrelease and v > chosen[-1]]
    return chosen + ([max(previews)] if previews else [])


def install(version: Version) -> Path:
    site = SITES / str(version)
    if not (site / ".installed").exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site), "--upgrade",
             f"transformers=={version}"],
            check=True,
        )  # fmt: skip
        (site / ".installed").touch()
    return site


def run_subset(site: Path) -> tuple[bool, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "compat", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
    if result.returncode:
        print(result.stdout[-6000:], result.stderr[-2000:], sep="\n")
    return result.returncode == 0, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the versions and stop")
    args = parser.parse_args()
    versions = versions_to_test(published_versions(), oldest_supported())
    print("Transformers versions to test:", ", ".join(map(str, versions)), flush=True)
    if args.list:
        return
    rows, failed = [], []
    for version in versions:
        start = time.monotonic()
        site = install(version)
        installed = time.monotonic()
        ok, summary = run_subset(site)
        rows.append(f"| {version} | {'pass' if ok else 'FAIL'} | {summary} | {installed - start:.0f} | "
                    f"{time.monotonic() - installed:.0f} |")  # fmt: skip
        print(rows[-1], flush=True)
        if not ok:
            failed.append(str(version))
    print("\n| Transformers | result | tests | install s | test s |\n| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if failed:
        raise SystemExit(f"the compat subset failed on Transformers {', '.join(failed)}")


if __name__ == "__main__":
    main()
