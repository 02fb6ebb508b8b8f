"""One experiment, one record (issue 27), through the commands a user types: a fine-tuning folder holds
one run, records name their source by what survives `cd` and moved folders, report.py counts each
(source, seed) once, reads scores and intervals from the same files and names the settings a pair differs in,
and a prediction file reproduces the recorded score exactly."""
import inspect
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import finetune
from evaluation import predictions
from evaluation import records
from plumbing import finetuning
import pretrain_cass
from evaluation import report
from conftest import TINY
from data import index_data
from errors import UserError
from evaluation.metrics import decide, headline_score


def ft(*argv: str) -> dict:
    """finetune.py with one short epoch unless argv says otherwise."""
    return finetune.main(finetune.parse_args(["--epochs", "1", "--workers", "0", "--resamples", "50", *argv]))


def make_report(folder: Path, out: Path) -> str:
    return report.main(report.parse_args([str(folder), "--out", str(out), "--resamples", "50"])).read_text()


def rows(text: str) -> list[list[str]]:
    """The cells of every fine-tuning table row."""
    return [line.strip("| ").split(" | ") for line in text.splitlines()
            if re.match(r"^\| (cass|random-init) \(", line)]


def test_a_relative_ckpt_of_two_pretraining_runs_gives_two_rows(cass_run, demo_data, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    shutil.copytree(cass_run, runs / "seed0", ignore=shutil.ignore_patterns("finetune-*", "linear-*"))
    pretrain_cass.main(pretrain_cass.parse_args(["--data", str(demo_data), "--out", str(runs / "seed1"),
                                                 "--epochs", "1", "--seed", "1", *TINY]))
    for run in ("seed0", "seed1"):
        monkeypatch.chdir(runs / run)
        result = ft("--ckpt", "cnn.pt")  # as typed: the same text in both runs
        assert result["source"] == "cnn.pt" and result["source_id"]["path"] == str(runs / run / "cnn.pt")
    table = rows(make_report(runs, tmp_path / "report"))
    assert sorted(r[2] for r in table) == ["seed0", "seed1"] and all("(n=1)" in r[3] for r in table)

    # the same checkpoint moved elsewhere is the same source: fine-tuning seed 0 there again counts it twice
    moved = tmp_path / "elsewhere" / "seed0"
    shutil.copytree(runs / "seed0", moved, ignore=shutil.ignore_patterns("finetune-*", "linear-*"))
    ft("--ckpt", str(moved / "cnn.pt"), "--out", str(runs / "seed0-again"))
    with pytest.raises(UserError, match=r"seed 0 of one experiment is in both .*seed0.* and .*seed0-again"):
        make_report(runs, tmp_path / "report2")


def test_re_running_a_seed_is_refused_by_the_report_never_averaged(demo_data, tmp_path):
    baseline = ["--arch", "test_resnet", "--no-pretrained", "--img-size", "32", "--data", str(demo_data)]
    for name in ("first", "second"):
        ft(*baseline, "--seeds", "0", "1", "--out", str(tmp_path / "runs" / name))
    with pytest.raises(UserError, match="seed 0 of one experiment is in both"):
        make_report(tmp_path / "runs", tmp_path / "report")
    assert len(rows(make_report(tmp_path / "runs" / "first", tmp_path / "report"))) == 1


def test_seeds_given_twice_are_refused(cass_run, tmp_path):
    with pytest.raises(UserError, match="seed 3 more than once"):
        ft("--ckpt", str(cass_run / "cnn.pt"), "--seeds", "3", "1", "3", "--out", str(tmp_path / "ft"))
    assert not (tmp_path / "ft").exists()


def test_a_fine_tuning_folder_holds_one_run(finetuned, cass_run, tmp_path, monkeypatch, capsys):
    # the default folder of a finished run is refused, its files untouched
    folder = finetuned[0].parent
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="already holds a finished fine-tuning run"):
        ft("--ckpt", str(cass_run / "cnn.pt"), "--epochs", "2")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before

    # a run stopped after its first seed (as the non-finite validation loss stops it) leaves no results.json ...
    out, real = tmp_path / "ft", finetune.run_seed

    def stopped(*args):
        if inspect.signature(real).bind(*args).arguments["seed"] == 1:
            raise UserError("the validation loss became non-finite at epoch 1 (seed 1)")
        return real(*args)
    monkeypatch.setattr(finetune, "run_seed", stopped)
    with pytest.raises(UserError, match="non-finite"):
        ft("--ckpt", str(cass_run / "cnn.pt"), "--seeds", "0", "1", "--out", str(out))
    monkeypatch.setattr(finetune, "run_seed", real)
    assert (out / "predictions_seed0.csv").is_file() and not (out / "results.json").exists()
    assert "No results.json found." in make_report(out, tmp_path / "report")
    # ... is refused under other settings, and started over under the same
    with pytest.raises(UserError, match=r"unfinished fine-tuning run of other settings \(epochs: 1 there, 2 here\)"):
        ft("--ckpt", str(cass_run / "cnn.pt"), "--seeds", "0", "1", "--out", str(out), "--epochs", "2")
    capsys.readouterr()
    result = ft("--ckpt", str(cass_run / "cnn.pt"), "--seeds", "0", "1", "--out", str(out))
    assert "starting it over" in capsys.readouterr().out
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    assert [json.loads(line)["seed"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1]

    # the scores in results.json are those of the prediction files beside it, bit for bit
    classes = tuple(result["classes"])
    for run in result["runs"]:
        p = predictions.read(out / run["predictions"]["file"], classes, False)
        assert headline_score("macro_f1", p.targets, decide(p.probs, False), False) == run["test"]["macro_f1"]
    # a prediction file another run wrote is refused, not paired with these scores
    shutil.copy(cass_run / "finetune-vit-frac1" / "predictions_seed0.csv", out / "predictions_seed0.csv")
    with pytest.raises(UserError, match="predictions_seed0.csv is not the prediction file its results.json recorded"):
        make_report(out, tmp_path / "report")


def test_how_a_run_executes_never_tells_runs_apart(tmp_path, capsys):
    # an unfinished run whose run.json holds flags.EXECUTION (as older versions wrote) is the same run
    out, identity = tmp_path / "ft", {"epochs": 1, "source": {"arch": "test_resnet", "pretrained": False}}
    out.mkdir()
    (out / "run.json").write_text(json.dumps({**identity, "compile": False, "grad_ckpt": False}))
    (out / "log.jsonl").write_text("{}\n")
    finetuning.claim_folder(out, identity, finetune.SEED_FILES)
    assert "starting it over" in capsys.readouterr().out and not (out / "log.jsonl").exists()
    assert json.loads((out / "run.json").read_text()) == identity
    with pytest.raises(UserError, match=r"other settings \(epochs: 1 there, 2 here\)"):
        finetuning.claim_folder(out, {**identity, "epochs": 2}, finetune.SEED_FILES)


def test_the_report_knows_each_protocols_default_learning_rate():
    assert records.DEFAULT_LR == finetune.LR  # a rate equal to it reads as unset


def test_files_of_another_run_in_the_folder_are_refused(cass_run, tmp_path):
    # e.g. --out pointing at the pretraining run, whose log.jsonl fine-tuning would rewrite
    with pytest.raises(UserError, match=r"holds files of another run \(log.jsonl\)"):
        ft("--ckpt", str(cass_run / "cnn.pt"), "--out", str(cass_run))


def test_prediction_files_keep_every_probability_exactly(demo_data, tmp_path):
    index = index_data(demo_data, workers=0)
    probs = np.array([[1.4e-7, 1 - 1.4e-7, 0.0, 0.0], [0.1 + 0.2, 0.7 - 1e-17, 1 / 3, 2 / 3]])
    predictions.write(tmp_path / "p.csv", index, [0, 1], probs)
    read = predictions.read(tmp_path / "p.csv", tuple(index.classes), False)
    order = np.argsort([index.paths[0], index.paths[1]])  # rows come back sorted by path
    assert np.array_equal(read.probs, probs[order])
    # a decision at a validation threshold between two close probabilities survives the round trip
    assert np.array_equal(decide(read.probs, True, np.full(4, 1.49e-7)), decide(probs[order], True, np.full(4, 1.49e-7)))


def test_pairs_whose_settings_differ_are_marked(cass_run, demo_data, tmp_path):
    runs = tmp_path / "runs"
    ft("--ckpt", str(cass_run / "cnn.pt"), "--epochs", "2", "--out", str(runs / "cass"))
    ft("--arch", "test_resnet", "--no-pretrained", "--img-size", "32", "--data", str(demo_data),
       "--out", str(runs / "random"))
    text = make_report(runs, tmp_path / "report")
    pairs = [line for line in text.splitlines() if re.match(r"^\| \d+% \|", line)]
    assert "settings differ (A vs B)" in text
    assert len(pairs) == 1 and pairs[0].rstrip(" |").endswith("epochs 2 vs 1")
    ft("--arch", "test_resnet", "--no-pretrained", "--img-size", "32", "--data", str(demo_data), "--epochs", "2",
       "--out", str(runs / "random2"))
    text = make_report(runs, tmp_path / "report")
    pairs = [line for line in text.splitlines() if re.match(r"^\| \d+% \| cass", line)]
    assert sorted(p.rstrip(" |").rsplit(" | ", 1)[1] for p in pairs) == ["-", "epochs 2 vs 1"]
