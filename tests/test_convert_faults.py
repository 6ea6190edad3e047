"""The converters under faults, in real processes: killed (SIGKILL) at several points, out of disk, fed a truncated,
foreign or missing shard. Afterwards the destination never looks like a finished checkpoint, a rerun gives the same
files as an uninterrupted run, and the source is byte-identical."""

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText

from conversion import convert_internvl2_to_internvl_x as converter
from devtools.checkpoints import internvl2_checkpoint
from tests.conftest import ROOT
from tests.utils.files import digest

SCRIPT = ROOT / "conversion" / "convert_internvl2_to_internvl_x.py"
SHARD_GB = 0.0004  # ~430 kB: the tiny model writes several output shards

# Runs the converter in a child process that kills itself (SIGKILL, as `kill -9`) at one point of the conversion.
KILLED_AT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from conversion import common
from conversion import convert_internvl2_to_internvl_x as script

def die():
    os.kill(os.getpid(), signal.SIGKILL)

point = {point!r}
if point == "in the second shard":
    save_file, calls = common.save_file, []
    def half_then_die(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as partial:
                partial.write(b"\\0" * 4096)
                partial.flush()
            die()
        return save_file(tensors, filename, metadata=metadata)
    common.save_file = half_then_die
elif point == "between the shards and the index":
    common.ShardWriter.write_index = lambda self, weight_map: die()
elif point == "before the config":
    from transformers import PretrainedConfig
    PretrainedConfig.save_pretrained = lambda self, *args, **kwargs: die()
elif point == "while saving the processor":
    from transformers import ProcessorMixin
    ProcessorMixin.save_pretrained = lambda self, *args, **kwargs: die()
script.main({argv!r})
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults") / "src"
    internvl2_checkpoint(folder, llm="internlm2", shards=3)
    return folder


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """An uninterrupted conversion (the same arguments as every faulty run)."""
    dst = tmp_path_factory.mktemp("reference") / "dst"
    converter.main(arguments(source, dst))
    assert len(list(dst.glob("model-*.safetensors"))) >= 3, "the fault tests need several output shards"
    return digest(dst)


def arguments(src: Path, dst: Path, *extra: str) -> list[str]:
    return ["--src", str(src), "--dst", str(dst), "--max-shard-size-gb", str(SHARD_GB), *extra]


def run(command: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_not_a_checkpoint(dst: Path) -> None:
    """Nothing at `dst` loads: `from_pretrained` fails and names the folder."""
    assert not dst.exists() or not any(dst.iterdir())
    with pytest.raises((OSError, ValueError), match=str(dst.name)):
        AutoModelForImageTextToText.from_pretrained(dst, trust_remote_code=True)


@pytest.mark.parametrize(
    "point",
    ["in the second shard", "between the shards and the index", "before the config", "while saving the processor"],
)
def test_a_killed_conversion_leaves_no_checkpoint_and_a_rerun_completes_it(source, reference, tmp_path, point):
    before = digest(source)
    dst = tmp_path / "dst"
    code = KILLED_AT.format(root=str(ROOT), point=point, argv=arguments(source, dst))
    killed = run(["-c", code], check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / ".dst.incomplete").is_dir()  # the work in progress, out of the way
    assert_not_a_checkpoint(dst)
    converter.main(arguments(source, dst, "--overwrite"))  # the rerun (in this process: it is not the one tested)
    assert digest(dst) == reference
    assert not (tmp_path / ".dst.incomplete").exists()  # the rerun cleared the killed run's staging folder
    assert digest(source) == before


def test_a_killed_overwrite_keeps_the_previous_checkpoint(source, reference, tmp_path):
    dst = tmp_path / "dst"
    converter.main(arguments(source, dst))
    code = KILLED_AT.format(root=str(ROOT), point="before the config", argv=arguments(source, dst, "--overwrite"))
    assert run(["-c", code], check=False).returncode == -signal.SIGKILL
    assert digest(dst) == reference


def test_a_full_disk_fails_cleanly(source, tmp_path):
    """Every file the child writes is capped (RLIMIT_FSIZE) below the size of one output shard."""
    before = digest(source)
    dst = tmp_path / "dst"
    limit = int(SHARD_GB * 2**30 // 2)

    def cap_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run([str(SCRIPT), *arguments(source, dst)], check=False, preexec_fn=cap_file_size)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "writing the converted checkpoint failed" in result.stderr and "too large" in result.stderr.lower()
    assert f"nothing was written to {dst}" in result.stderr
    assert not (tmp_path / ".dst.incomplete").exists()
    assert_not_a_checkpoint(dst)
    assert digest(source) == before


def broken_copy(source: Path, folder: Path, fault: str) -> tuple[Path, str]:
    """A copy of `source` with one fault; returns it and the file the error must name."""
    copy = folder / "src"
    shutil.copytree(source, copy)
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    if fault == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif fault == "not safetensors":
        shard.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 100)
    elif fault == "index names a missing shard":
        index = json.loads((copy / "model.safetensors.index.json").read_text())
        index["weight_map"]["vision_model.embeddings.class_embedding"] = "model-00009-of-00009.safetensors"
        (copy / "model.safetensors.index.json").write_text(json.dumps(index))
        return copy, "model-00009-of-00009.safetensors"
    return copy, shard.name


@pytest.mark.parametrize("fault", ["truncated shard", "not safetensors", "index names a missing shard"])
def test_a_broken_source_is_refused_naming_the_file(source, tmp_path, fault, capsys):
    broken, name = broken_copy(source, tmp_path, fault)
    before = digest(broken)
    dst = tmp_path / "dst"
    with pytest.raises(SystemExit) as exit_info:
        converter.main(arguments(broken, dst))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "conversion refused" in stderr and name in stderr, stderr[-2000:]
    assert not dst.exists() and not (tmp_path / ".dst.incomplete").exists()
    assert digest(broken) == before


def test_the_destination_may_not_contain_the_source(source, capsys):
    with pytest.raises(SystemExit):
        converter.main(arguments(source, source.parent, "--overwrite"))
    assert "must not contain each other" in capsys.readouterr().err
    assert (source / "config.json").exists()


def with_tensor(source: Path, folder: Path, name: str, change=None) -> Path:
    """A copy of `source` whose tensor `name` is `change(tensor)`, or is gone (and unnamed by the index) without
    `change`."""
    from safetensors.torch import load_file, save_file

    copy = folder / "src"
    shutil.copytree(source, copy)
    index_file = copy / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = copy / (index["weight_map"][name] if change else index["weight_map"].pop(name))
    tensors = load_file(shard)
    if change:
        tensors[name] = change(tensors[name]).contiguous()
    else:
        del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    return copy


@pytest.mark.parametrize(
    "fault,message",
    [
        (
            "a shard left out of the index",
            r"does not name model-00003-of-00003\.safetensors, which .* holds: the index "
            "is incomplete",
        ),
        ("no tokenizer", r"has no tokenizer \(tokenizer\.model or tokenizer\.json\)"),
        (
            "a vision tensor missing",
            r"model tensors missing from the source \(1\):\n  "
            r"model\.vision_tower\.encoder\.layer\.1\.attention\.projection_layer\.bias",
        ),
        (
            "a wqkv one row short",
            r"language_model\.model\.layers\.1\.attention\.wqkv\.weight has shape \(\d+, \d+\): \d+ rows, but \d+ KV "
            r"heads × \(\d+ queries \+ key \+ value\) × head_dim \d+ = \d+",
        ),
    ],
)
def test_a_faulty_source_is_refused_for_what_is_wrong(source, tmp_path, fault, message, capsys):
    """Each was misreported before: the left-out shard as 'the source projector lacks ...', the tokenizer as a slow
    tokenizer conversion error, a missing vision tensor was initialised at random without a word, and a fused wqkv of
    the wrong size failed in a bare reshape naming no tensor."""
    if fault == "a shard left out of the index":
        broken = tmp_path / "src"
        shutil.copytree(source, broken)
        index = json.loads((broken / "model.safetensors.index.json").read_text())
        last = sorted(set(index["weight_map"].values()))[-1]
        index["weight_map"] = {name: file for name, file in index["weight_map"].items() if file != last}
        (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    elif fault == "no tokenizer":
        broken = tmp_path / "src"
        shutil.copytree(source, broken)
        for path in [*broken.glob("tokeni*"), broken / "special_tokens_map.json"]:
            path.unlink(missing_ok=True)
    elif fault == "a vision tensor missing":
        broken = with_tensor(source, tmp_path, "vision_model.encoder.layers.1.attn.proj.bias")
    else:
        name = "language_model.model.layers.1.attention.wqkv.weight"
        broken = with_tensor(source, tmp_path, name, lambda tensor: tensor[:-1])
    with pytest.raises(SystemExit):
        converter.main(arguments(broken, tmp_path / "dst"))
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "dst").exists()


def test_each_converter_names_the_other_for_the_other_s_checkpoints(source, tmp_path, capsys):
    from conversion import convert_official_internvl_x as official
    from devtools.checkpoints import released_internvl_x

    with pytest.raises(SystemExit):
        official.main(["--src", str(source), "--dst", str(tmp_path / "a")])
    assert (
        "holds an OpenGVLab InternVL2 checkpoint (an mlp1 projector), by its tensor names: convert it with "
        "conversion/convert_internvl2_to_internvl_x.py" in capsys.readouterr().err
    )
    released_internvl_x(tmp_path / "release")
    with pytest.raises(SystemExit):
        converter.main(arguments(tmp_path / "release", tmp_path / "b"))
    assert (
        "holds the authors' InternVL-X release (a PVTC projector), by its tensor names: convert it with "
        "conversion/convert_official_internvl_x.py" in capsys.readouterr().err
    )


def test_a_failed_upload_says_the_checkpoint_is_written(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dst = tmp_path / "dst"
    with pytest.raises(SystemExit) as exit_info:
        converter.main(arguments(source, dst, "--push-to-hub", "someone/internvl-x"))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert f"converted, not uploaded: the converted checkpoint is complete in {dst}, but uploading it to " in stderr
    assert "nothing was written" not in stderr and "conversion refused" not in stderr
    AutoModelForImageTextToText.from_pretrained(dst, trust_remote_code=True)  # it is there, whole
