"""`efficient-transformers lra`: trains each pair, writes the leaderboard files, resumes."""

import json

from efficient_transformers.cli import main

TINY = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--dim", "16", "--depth", "1",
        "--heads", "2", "--mlp-dim", "32", "--eval-examples", "4", "--no-progress"]


def test_leaderboard_and_resume(tmp_path, capsys):
    out = tmp_path / "board"
    args = ["lra", "--models", "transformer", "--tasks", "listops,mqar", "--out", str(out),
            "--preset", "small"]
    assert main(args + TINY) == 0
    result_file = out / "listops" / "transformer" / "result.json"
    before = result_file.stat().st_mtime_ns
    assert main(args + TINY) == 0
    assert result_file.stat().st_mtime_ns == before
    # --report-only trains nothing: an unfinished pair is listed as pending
    assert main(args[:4] + ["listops,mqar,pathfinder"] + args[5:] + TINY + ["--report-only"]) == 0
    pending = json.loads((out / "leaderboard.json").read_text())
    assert pending["rows"]["transformer"]["pathfinder"]["status"] == "pending"
    assert pending["rows"]["transformer"]["listops"]["status"] == "ok"
    assert not (out / "pathfinder").exists()
    assert main(args + TINY) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["tasks"] == ["listops", "mqar"] and board["models"] == ["transformer"]
    for task in ("listops", "mqar"):
        row = board["rows"]["transformer"][task]
        assert row["status"] == "ok" and 0 <= row["accuracy"] <= 1 and row["train_seconds"] > 0
        assert task in board["chance"]
    md = (out / "leaderboard.md").read_text()
    assert "| Model | ListOps | MQAR | Avg |" in md and "| transformer |" in md and "chance" in md
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failing_pairs_are_listed(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["lra", "--models", "transformer", "--tasks", "mqar", "--out", str(out),
                 "--option", "bogus=1", "--preset", "small"] + TINY) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    row = board["rows"]["transformer"]["mqar"]
    assert row["status"] == "failed" and "bogus" in row["reason"]
    assert "n/a" in (out / "leaderboard.md").read_text()
    assert main(["lra", "--models", "transformer", "--tasks", "mqar", "--out", str(out),
                 "--report-only"]) == 0
    again = json.loads((out / "leaderboard.json").read_text())["rows"]["transformer"]["mqar"]
    assert again["status"] == "failed" and "bogus" in again["reason"]


def test_model_specific_options():
    from efficient_transformers.commands.train import model_options

    pairs = ["window=4", "axial_transformer:shape=[8, 16]", "performer:features=8"]
    assert model_options(pairs, "axial_transformer") == {"window": 4, "shape": [8, 16]}
    assert model_options(pairs, "transformer") == {"window": 4}


def test_unknown_names(capsys, tmp_path):
    assert main(["lra", "--models", "nope", "--tasks", "listops", "--out", str(tmp_path)]) == 2
    assert "--models" in capsys.readouterr().err


def test_a_name_given_twice_counts_once():
    from efficient_transformers.commands.lra import split_list

    assert split_list("transformer, performer,transformer", ["transformer", "performer"],
                      "--models") == ["transformer", "performer"]   # one leaderboard row each
