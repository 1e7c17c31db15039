"""A miniature `make demo`: every stage end to end on a few identities and a few steps."""

import json

import numpy as np
import pytest
import torch

import demo
from models import load_backbone


@pytest.mark.slow  # the whole pipeline: generate, MTCNN, pack, train, evaluate
def test_miniature_demo_end_to_end(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    argv = ["--data-dir", str(data), "--run-dir", str(runs), "--train-identities", "6",
            "--train-images", "4", "--eval-identities", "10", "--eval-images", "3",
            "--pairs-per-fold", "1", "--max-steps", "6", "--batch-size", "8"]
    assert demo.main(argv) == 0

    report = json.loads((runs / "report.json").read_text())
    for key in ("accuracy", "accuracy_std", "untrained_accuracy", "seconds"):
        assert key in report
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["untrained_accuracy"] <= 1.0
    assert report["pairs"] == 20  # 10 folds x (1 same + 1 different)
    assert report["train_steps"] == 6

    # every stage left its output in the real formats
    assert len(list((data / "train").rglob("*.jpg"))) == 24
    assert len(list((data / "train_aligned").rglob("*.jpg"))) == 24
    assert (data / "train.rec").stat().st_size > 0 and (data / "train.idx").is_file()
    for name in ("lfw_*_roc.png", "lfw_*_hist.png", "lfw_*_errors.png", "lfw_*_results.json"):
        assert len(list((runs / "eval").glob(name))) == 1, name
    assert list(runs.rglob("events.out.tfevents.*")), "no TensorBoard log"
    assert (runs / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the trained backbone differs from the untrained one and loads for evaluation
    trained = load_backbone(runs / "backbone.pt")
    untrained = load_backbone(runs / "untrained" / "backbone.pt")
    x = torch.zeros(1, 3, 112, 112)
    with torch.no_grad():
        assert not np.allclose(trained(x).numpy(), untrained(x).numpy())

    # a second run reuses every finished stage and reports the same trained accuracy
    before = (runs / "backbone.pt").stat().st_mtime_ns
    assert demo.main(argv) == 0
    again = json.loads((runs / "report.json").read_text())
    assert again["accuracy"] == report["accuracy"]
    assert (runs / "backbone.pt").stat().st_mtime_ns == before


def test_a_rerun_with_other_data_parameters_is_refused(tmp_path, monkeypatch, capsys):
    """The generator adds images and never removes any, and the packed set and the trained
    run are reused: `demo.py --train-identities 3` after a 6-identity demo in the same folders
    reported the 6-identity model as the new demo's. The stages are stubbed: this is about
    what the folders hold before any of them runs."""
    from utils import run_cli

    stages = []
    monkeypatch.setattr(demo, "_run_demo", lambda *args: stages.append(args) or {})
    data, runs = tmp_path / "data", tmp_path / "runs"
    first = ["--data-dir", str(data), "--run-dir", str(runs), "--train-identities", "6",
             "--eval-identities", "10", "--seed", "1"]
    assert run_cli(demo.main, first) == 0
    assert run_cli(demo.main, first + ["--max-steps", "4"]) == 0  # same data: reused
    assert len(stages) == 2
    capsys.readouterr()

    assert run_cli(demo.main, first + ["--train-identities", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --data-dir {data}: holds a demo made with --train-identities 6 "
                   f"(asked: 3); the demo reuses what a folder holds: give it a --data-dir of "
                   f"its own, or remove {data}"), err
    # a fresh data folder beside the old run: the run trained on other data is refused too
    other = tmp_path / "data2"
    assert run_cli(demo.main, ["--data-dir", str(other), "--run-dir", str(runs),
                               "--train-identities", "6", "--eval-identities", "10",
                               "--seed", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --run-dir {runs}: holds a demo made with --seed 1 "
                          "(asked: 2)"), err
    assert len(stages) == 2 and not (other / demo.DATA_STAMP).exists()
