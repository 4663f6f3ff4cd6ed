"""The registry, the zoo command and atomic I/O."""

import json
import subprocess
import sys

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.cli import main
from efficient_transformers.io import atomic_write_bytes, load_tensors, save_tensors
from efficient_transformers.zoo import SURVEY_TABLE


def test_survey_table_has_the_baseline_and_seventeen_x_formers():
    assert len(SURVEY_TABLE) == 18 and "transformer" in SURVEY_TABLE
    assert set(et.list_attention()) <= set(SURVEY_TABLE)
    assert et.list_models() == et.list_attention()


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention 'nope'"):
        et.build_attention("nope")


def test_spec_is_frozen():
    spec = et.attention_spec("transformer")
    with pytest.raises(Exception):
        spec.name = "x"


def test_zoo_command_prints_every_row(capsys):
    assert main(["zoo"]) == 0
    text = capsys.readouterr().out
    for row in SURVEY_TABLE.values():
        assert row.title in text and row.complexity in text
    assert main(["zoo", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(SURVEY_TABLE)
    assert {r["name"] for r in rows if r["implemented"] == "yes"} == set(et.list_attention())
    assert main(["zoo", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("| name | title |")


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "efficient_transformers", "zoo"],
                         capture_output=True, text=True, check=True).stdout
    assert "Big Bird" in out


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary left behind


def test_tensors_round_trip_through_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(tmp_path / "t.safetensors", tensors)
    back = load_tensors(tmp_path / "t.safetensors")
    assert all(torch.equal(tensors[k], back[k]) for k in tensors)
