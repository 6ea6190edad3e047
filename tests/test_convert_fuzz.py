"""Property-based check of the converters' command lines: any mix of `--max-patches`, `--pvtc-num-heads`,
`--max-shard-size-gb` values (numbers, zero, negative, `nan`, `inf`, words, nothing) and `--dst` folders (new, empty,
the working directory and above, the source, links, a file, the user's folder, a converted checkpoint) with or
without `--overwrite`. Each run is refused in one line naming the first wrong argument, or gets as far as reading
weights (where this test stops it); and in every case the user's files and the source are untouched and nothing is
left behind. Hand-picked cases are named."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversion import convert_internvl2_to_internvl_x as internvl2
from conversion import convert_official_internvl_x as official
from devtools.checkpoints import internvl2_checkpoint
from tests.utils.files import digest

CONVERTERS = {"internvl2": internvl2, "official": official}
# option: (kind, least value), in the order the converters check them
OPTIONS = {"--max-patches": ("whole", 1), "--pvtc-num-heads": ("whole", 1), "--max-shard-size-gb": ("positive", 0)}
HIDDEN_SIZE = 64  # the tiny source's language model width, which PVTC's heads must divide
DESTINATIONS = {
    "new folder": None,
    "empty folder": None,
    "link to a new folder": None,
    "converted checkpoint": None,
    "working directory": "is the working directory",
    "empty name": "is empty",
    "blank name": "is empty",
    "parent": "is the working directory or a folder above it",
    "link to the working directory": "is the working directory or a folder above it",
    "source": "must not contain each other",
    "inside the source": "must not contain each other",
    "link to the source": "must not contain each other",
    "a file": "is a file",
    "the user's folder": "is not empty",
}


class ReachedWeights(Exception):
    """Raised where the converter starts reading tensors: every check before it has passed."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A source checkpoint, a converted one, and a working directory of the user's files with links around it."""
    root = tmp_path_factory.mktemp("convert-fuzz")
    source = root / "src"
    internvl2_checkpoint(source, llm="internlm2", shards=1)
    work = root / "home" / "work"
    (work / "photos").mkdir(parents=True)
    (work / "notes.txt").write_text("the user's notes")
    (work / "photos" / "cat.png").write_bytes(b"not really a png")
    internvl2.main(["--src", str(source), "--dst", str(root / "converted")])
    (root / "empty").mkdir()
    (root / "link-to-work").symlink_to(work)
    (root / "link-to-src").symlink_to(source)
    (root / "link-to-new").symlink_to(root / "not-yet", target_is_directory=True)
    paths = {
        "new folder": str(root / "new"),
        "empty folder": str(root / "empty"),
        "link to a new folder": str(root / "link-to-new"),
        "converted checkpoint": str(root / "converted"),
        "working directory": ".",
        "empty name": "",
        "blank name": "  ",
        "parent": "..",
        "link to the working directory": str(root / "link-to-work"),
        "source": str(source),
        "inside the source": str(source / "inside"),
        "link to the source": str(root / "link-to-src"),
        "a file": str(work / "notes.txt"),
        "the user's folder": str(work / "photos"),
    }
    return root, source, work, paths


def parsed(text: str, kind: str) -> float | None:
    """The value argparse gives `text` for an option of `kind` (int or float), or None if it refuses it."""
    try:
        return float(text) if kind == "positive" else int(text)
    except ValueError:
        return None


def expected_refusal(converter, options: dict[str, str], destination: str, overwrite: bool) -> tuple[int, str] | None:
    """(exit status, text the refusal must hold) for the first wrong argument, or None if all are right."""
    for name, text in options.items():  # argparse reads every option before any check runs
        if parsed(text, OPTIONS[name][0]) is None:
            return 2, f"argument {name}: invalid"
    for name in [name for name in OPTIONS if name in options]:  # the converters check them in this order
        kind, minimum = OPTIONS[name]
        value = parsed(options[name], kind)
        if kind == "positive":
            wrong = not math.isfinite(value) or value <= minimum or not 1 <= value * 2**30 < math.inf
        else:
            wrong = value < minimum
        if wrong:
            return 1, name
    message = DESTINATIONS[destination]
    if destination == "converted checkpoint" and not overwrite:
        message = "is not empty"
    if destination == "the user's folder" and overwrite:
        message = "not a checkpoint these converters wrote"
    if message:
        return 1, message
    heads = parsed(options.get("--pvtc-num-heads", "16"), "whole")
    if converter is internvl2 and HIDDEN_SIZE % heads:
        return 1, f"pvtc_num_heads {heads} must divide the language model's hidden size {HIDDEN_SIZE}"
    return None


values = st.one_of(
    st.integers(-3, 40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e3", "0.5", "", "six", "0x10", " 4", "4 ", "1_000", "٣"]),
)


def run(converter, world, options: dict[str, str], destination: str, overwrite: bool, capsys, monkeypatch):
    root, source, work, paths = world
    before = digest(root)
    monkeypatch.chdir(work)
    monkeypatch.setattr("conversion.common.iter_source_tensors", lambda *a: (_ for _ in ()).throw(ReachedWeights))
    argv = ["--src", str(source), "--dst", paths[destination], *(["--overwrite"] if overwrite else [])]
    argv += [f"{name}={text}" for name, text in options.items()]
    expected = expected_refusal(converter, options, destination, overwrite)
    capsys.readouterr()
    try:
        converter.main(argv)
        outcome = "converted"
    except ReachedWeights:
        outcome = "reached weights"
    except SystemExit as exit_info:
        outcome = exit_info.code
    err = capsys.readouterr().err
    if expected is None and converter is internvl2:
        assert outcome == "reached weights", (argv, outcome, err)
    elif expected is None:  # the official converter refuses an InternVL2 source, in one line, having read its keys
        assert outcome == 1 and "conversion refused" in err and len(err.strip().splitlines()) == 2, (argv, err)
    else:
        code, text = expected
        assert outcome == code and text in err, (argv, outcome, err)
        if code == 1:
            assert err.startswith("conversion refused:\n") and len(err.strip().splitlines()) == 2, err
            named = [name for option in options for name in (option, option.strip("-").replace("-", "_"))]
            assert "--dst" in err or any(name in err for name in named), err  # an option, or its config field
    assert digest(root) == before, argv
    assert not list(root.rglob(".*.incomplete")) and not (root / "new").exists() and not (root / "not-yet").exists()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    converter=st.sampled_from(sorted(CONVERTERS)),
    options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), values, max_size=3),
    destination=st.sampled_from(sorted(DESTINATIONS)),
    overwrite=st.booleans(),
)
def test_any_command_line_is_refused_by_name_or_proceeds_and_touches_nothing(
    world, converter, options, destination, overwrite, capsys, monkeypatch
):
    run(CONVERTERS[converter], world, options, destination, overwrite, capsys, monkeypatch)


NAMED = {
    "defaults into a new folder": ({}, "new folder", False),
    "overwrite a converted checkpoint": ({}, "converted checkpoint", True),
    "dst . --overwrite": ({}, "working directory", True),
    "dst '' --overwrite": ({}, "empty name", True),
    "overwrite the user's folder": ({}, "the user's folder", True),
    "zero tiles": ({"--max-patches": "0"}, "new folder", False),
    "fractional tiles": ({"--max-patches": "2.5"}, "new folder", False),
    "nan shard size": ({"--max-shard-size-gb": "nan"}, "new folder", False),
    "infinite shard size": ({"--max-shard-size-gb": "inf"}, "new folder", False),
    "negative shard size": ({"--max-shard-size-gb": "-1"}, "new folder", False),
    "zero heads": ({"--pvtc-num-heads": "0"}, "new folder", False),
    "a word for heads": ({"--pvtc-num-heads": "sixteen"}, "new folder", False),
    "shard size too large to count in bytes": ({"--max-shard-size-gb": "1e308"}, "new folder", False),
    "shard size under a byte": ({"--max-shard-size-gb": "1e-12"}, "new folder", False),
    "bad option and bad dst": ({"--max-patches": "-1"}, "working directory", True),
}


@pytest.mark.parametrize("converter", sorted(CONVERTERS))
@pytest.mark.parametrize("case", NAMED.values(), ids=NAMED.keys())
def test_named_command_lines(world, converter, case, capsys, monkeypatch):
    run(CONVERTERS[converter], world, *case, capsys, monkeypatch)
