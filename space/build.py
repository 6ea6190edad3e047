"""Assemble a Hugging Face Space from this folder: the app, its README (the Space's card) and requirements, and the
digits demo checkpoint beside them (its files copied, links resolved, so the Space holds what the demo links to).

    python space/build.py OUT

OUT must not exist yet: nothing already on disk is overwritten. Push OUT as a Space (`huggingface-cli upload`, or git).
"""

import argparse
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "examples" / "digits-demo"
FILES = ("app.py", "README.md", "requirements.txt")


def build(out: Path) -> Path:
    if out.exists():
        raise SystemExit(f"{out} exists already; give a new folder (nothing on disk is overwritten).")
    out.mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(HERE / name, out / name)
    shutil.copytree(DEMO, out / "digits-demo", symlinks=False)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder to write (must not exist)")
    args = parser.parse_args(argv)
    print(f"wrote {build(args.out)}")


if __name__ == "__main__":
    main()
