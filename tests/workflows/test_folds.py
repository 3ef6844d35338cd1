"""train --folds K and the averaged-probability ensemble predict opens a folds run as."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import unetkit
from unetkit.cli.main import main
from unetkit.data.synthetic import write_synthetic_folder
from unetkit.errors import CheckpointError, ConfigError
from unetkit.formats.loading import load_ensemble, load_model_file
from unetkit.models.ensemble import ProbabilityEnsemble
from unetkit.workflows.folds import fold_of_each
from unetkit.workflows.segment import InferenceOptions, predict_image

TINY = ["--model-option", "channels=(4,8)", "--epochs", "1", "--batch-size", "2"]
TINY += ["--crop", "32", "--steps-per-epoch", "2", "--no-progress"]


def _nets(n: int, **options) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [unetkit.create_model("unet", channels=(4, 8), **options).eval() for _ in range(n)]


def test_ensemble_returns_the_logits_of_the_mean_probabilities():
    nets = _nets(3, out_channels=3)
    x = torch.randn(2, 1, 20, 24)
    with torch.no_grad():
        expected = torch.stack([n(x).double().softmax(1) for n in nets]).mean(0)
        got = ProbabilityEnsemble(nets)(x).softmax(1)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


def test_ensemble_of_sigmoid_models_and_valid_padding_geometry():
    nets = _nets(2, out_channels=1)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        expected = torch.stack([n(x).sigmoid() for n in nets]).mean(0)
        got = ProbabilityEnsemble(nets)(x).sigmoid()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    paper = [unetkit.create_model("unet", channels=(4, 8), padding="valid") for _ in range(2)]
    ens = ProbabilityEnsemble(paper)
    assert ens.is_valid_padding and ens.output_size_for((44, 44)) == paper[0].output_size_for(
        (44, 44)
    )


def test_ensemble_members_must_share_their_architecture():
    a = unetkit.create_model("unet", channels=(4, 8))
    b = unetkit.create_model("unet", channels=(4, 16))
    with pytest.raises(ConfigError, match="member 1"):
        ProbabilityEnsemble([a, b])
    with pytest.raises(ConfigError, match="no members"):
        ProbabilityEnsemble([])


def test_predict_image_averages_the_members_probabilities(tmp_path):
    nets = _nets(2)
    extra = {"task": "segmentation", "target": "semantic", "normalize": "zscore"}
    paths = [
        unetkit.save(n, tmp_path / f"m{i}.safetensors", extra=extra) for i, n in enumerate(nets)
    ]
    model, meta = load_ensemble(paths)
    assert isinstance(model, ProbabilityEnsemble) and len(meta["ensemble"]) == 2
    image = np.random.default_rng(0).random((1, 40, 36)).astype(np.float32)
    fp32 = InferenceOptions(precision="fp32")
    each = [predict_image(n, image, meta, fp32).probabilities for n in nets]
    joint = predict_image(model, image, meta, fp32).probabilities
    np.testing.assert_allclose(joint, np.mean(each, axis=0), atol=1e-5)
    fast = predict_image(model, image, meta, InferenceOptions()).probabilities  # default path
    np.testing.assert_allclose(fast, joint, atol=0.05)


def test_members_trained_differently_are_refused(tmp_path):
    nets = _nets(2)
    a = unetkit.save(nets[0], tmp_path / "a.safetensors", extra={"target": "semantic"})
    b = unetkit.save(nets[1], tmp_path / "b.safetensors", extra={"target": "boundary"})
    with pytest.raises(CheckpointError, match="target='boundary' differs"):
        load_ensemble([a, b])


def test_fold_of_each_deals_every_image_once_in_near_equal_folds():
    folds = fold_of_each(11, 4, seed=3)
    assert sorted(np.bincount(folds)) == [2, 3, 3, 3]
    assert folds == fold_of_each(11, 4, seed=3) and folds != fold_of_each(11, 4, seed=4)


def test_train_folds_then_predict_and_evaluate_the_ensemble(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic_folder(data, 5, shape=(48, 40), seed=1)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--folds", "2", "--out", str(run), *TINY]) == 0
    record = json.loads((run / "folds.json").read_text())
    held = [Path(p).name for f in record["folds"] for p in f["validation_images"]]
    assert sorted(held) == sorted(p.name for p in (data / "images").iterdir())  # once each
    for f in record["folds"]:
        config = json.loads((run / f"fold_{f['fold']}" / "config.json").read_text())["run"]
        trained = {p.name for p in (Path(config["data"]) / "images").iterdir()}
        validated = {p.name for p in (Path(config["val_data"]) / "images").iterdir()}
        assert validated == {Path(p).name for p in f["validation_images"]}
        assert not trained & validated and len(trained | validated) == 5
    model, meta = load_model_file(run)
    assert isinstance(model, ProbabilityEnsemble) and len(model.members) == 2
    first = sorted((data / "images").iterdir())[0]
    assert unetkit.predict(run, first).probabilities.shape[1:] == (48, 40)  # the Python API
    assert "fold 1:" in capsys.readouterr().out
    assert main(["predict", str(run), str(data / "images"), "--out", str(tmp_path / "p")]) == 0
    assert len(list((tmp_path / "p").glob("*_instances.png"))) == 5
    onnx = ["predict", str(run), str(data / "images"), "--out", str(tmp_path / "o")]
    assert main([*onnx, "--backend", "onnx"]) == 2
    assert "runs with --backend torch" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--data", str(data)]) == 0
    assert "dice_mean" in capsys.readouterr().out
    # the same --out with another K would resume models split otherwise: refused
    assert main(["train", "--data", str(data), "--folds", "3", "--out", str(run), *TINY]) == 2
    assert "holds --folds 2" in capsys.readouterr().err


def test_folds_refuse_what_they_cannot_do(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic_folder(data, 2, shape=(32, 32), seed=1)
    out = ["--out", str(tmp_path / "run"), *TINY]
    assert main(["train", "--data", str(data), "--folds", "3", *out]) == 2
    assert "holds 2 image(s)" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--folds", "2", "--val-data", str(data), *out]) == 2
    assert "leave out --val-data" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--folds", "1", *out]) == 2
    assert "at least 2 folds" in capsys.readouterr().err
    assert main(["train", "--folds", "2", *out]) == 2  # built-in synthetic data: no folder
    assert "--folds 2" in capsys.readouterr().err


def test_a_plain_run_directory_runs_with_the_onnx_backend(tmp_path):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    extra = {"task": "segmentation", "target": "semantic", "normalize": "zscore"}
    unetkit.save(_nets(1)[0], run / "checkpoints" / "best.safetensors", extra=extra)
    write_synthetic_folder(tmp_path / "data", 1, shape=(32, 32), seed=2)
    args = ["predict", str(run), str(tmp_path / "data" / "images"), "--out", str(tmp_path / "o")]
    assert main([*args, "--backend", "onnx"]) == 0
    assert (run / "checkpoints" / "best.safetensors.onnx").is_file()  # exported beside it
