"""The converters never delete what they did not create: every `--dst` that could reach the user's files (the working
directory, a folder above it, an empty name, the source, a link to any of those, a folder of other files under
`--overwrite`) is refused in one line, before anything is read or written, and the sentinel files around survive.
Options no conversion can use are refused the same way, naming the option and its value."""

import pytest

from conversion import convert_internvl2_to_internvl_x as internvl2
from conversion import convert_official_internvl_x as official
from devtools.checkpoints import internvl2_checkpoint
from tests.utils.files import digest

SENTINELS = ("notes.txt", "photos/cat.png", "config.json")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety") / "src"
    internvl2_checkpoint(folder, llm="internlm2", shards=1)
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A working directory holding the user's files (one of them a `config.json` that is not a checkpoint's)."""
    folder = tmp_path / "home" / "work"
    for name in SENTINELS:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"the user's {name}")
    monkeypatch.chdir(folder)
    return folder


def refused(converter, argv: list[str], capsys) -> str:
    capsys.readouterr()  # what earlier conversions printed
    with pytest.raises(SystemExit) as exit_info:
        converter.main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("conversion refused:\n") and len(err.strip().splitlines()) == 2, err
    return err.strip().splitlines()[1]


def dst_cases(home, source) -> dict[str, str]:
    (home.parent / "link-to-work").symlink_to(home)
    (home.parent / "link-to-src").symlink_to(source)
    return {
        ".": "is the working directory",
        "": "is empty",
        "  ": "is empty",
        "..": "is the working directory or a folder above it",
        str(home.parent.parent): "is the working directory or a folder above it",
        str(home.parent / "link-to-work"): "a link to",
        str(source): "must not contain each other",
        str(source / "inside"): "must not contain each other",
        str(home.parent / "link-to-src"): "must not contain each other",
        str(home / "notes.txt"): "is a file",
        str(home / "photos"): "is not empty",
    }


@pytest.mark.parametrize("overwrite", [False, True], ids=["", "overwrite"])
@pytest.mark.parametrize("converter", [internvl2, official], ids=["internvl2", "official"])
def test_no_destination_that_reaches_the_users_files_is_accepted(converter, source, home, overwrite, capsys):
    before_home, before_source = digest(home.parent.parent), digest(source)
    for dst, message in dst_cases(home, source).items():
        if overwrite and message == "is not empty":
            message = "not a checkpoint these converters wrote"
        argv = ["--src", str(source), "--dst", dst, *(["--overwrite"] if overwrite else [])]
        line = refused(converter, argv, capsys)
        assert message in line and f"--dst {dst!r}" in line, (dst, line)
        assert digest(home.parent.parent) == before_home and digest(source) == before_source, dst
    assert not list(home.parent.parent.rglob(".*.incomplete"))


def test_overwrite_replaces_a_converted_checkpoint_and_nothing_else(source, home, capsys):
    dst = home.parent / "converted"
    internvl2.main(["--src", str(source), "--dst", str(dst)])
    first = digest(dst)
    internvl2.main(["--src", str(source), "--dst", str(dst), "--overwrite", "--seed", "1"])
    assert digest(dst).keys() == first.keys() and digest(dst) != first
    (dst / "my-notes.txt").write_text("not the converter's")
    line = refused(internvl2, ["--src", str(source), "--dst", str(dst), "--overwrite"], capsys)
    assert "not a checkpoint these converters wrote" in line
    assert (dst / "my-notes.txt").read_text() == "not the converter's"


def test_an_empty_existing_folder_receives_the_checkpoint(source, home):
    dst = home.parent / "empty"
    dst.mkdir()
    internvl2.main(["--src", str(source), "--dst", str(dst)])
    assert (dst / "config.json").exists() and list(dst.glob("model*.safetensors"))


def test_a_link_to_a_new_folder_receives_the_checkpoint(source, home):
    target = home.parent / "real"
    link = home.parent / "link"
    link.symlink_to(target, target_is_directory=True)
    internvl2.main(["--src", str(source), "--dst", str(link)])
    assert link.is_symlink() and (target / "config.json").exists()


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--max-patches", "0", "--max-patches must be a whole number ≥ 1, got 0"),
        ("--max-patches", "-3", "--max-patches must be a whole number ≥ 1, got -3"),
        ("--pvtc-num-heads", "0", "--pvtc-num-heads must be a whole number ≥ 1, got 0"),
        ("--max-shard-size-gb", "0", "--max-shard-size-gb must be a finite number of gigabytes above 0, got 0.0"),
        ("--max-shard-size-gb", "-1", "--max-shard-size-gb must be a finite number of gigabytes above 0, got -1.0"),
        ("--max-shard-size-gb", "nan", "--max-shard-size-gb must be a finite number of gigabytes above 0, got nan"),
        ("--max-shard-size-gb", "inf", "--max-shard-size-gb must be a finite number of gigabytes above 0, got inf"),
    ],
)
@pytest.mark.parametrize("converter", [internvl2, official], ids=["internvl2", "official"])
def test_options_no_conversion_can_use_are_refused_before_anything_is_read(
    converter, source, home, option, value, message, capsys, monkeypatch
):
    read = []
    monkeypatch.setattr("conversion.common.iter_source_tensors", lambda *a: read.append(a) or iter(()))
    dst = home.parent / "new"
    line = refused(converter, ["--src", str(source), "--dst", str(dst), option, value], capsys)
    assert line == message and not read and not dst.exists()


def test_a_head_count_that_does_not_divide_the_width_is_refused_before_any_weight_is_read(source, home, capsys):
    line = refused(
        internvl2, ["--src", str(source), "--dst", str(home.parent / "new"), "--pvtc-num-heads", "3"], capsys
    )
    assert "pvtc_num_heads 3 must divide the language model's hidden size 64" in line
