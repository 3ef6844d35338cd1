from __future__ import annotations

import pytest
import torch

from unetkit.errors import ConfigError
from unetkit.workflows import segment_train as R
from unetkit.workflows.segment_task import SegmentationLoss


def test_paper_recipe_is_the_paper() -> None:
    r = R.make_recipe("paper")
    assert (r.preset, r.loss, r.optimizer, r.momentum, r.elastic) == (
        "paper",
        "weighted_ce",
        "sgd",
        0.99,
        True,
    )
    with torch.device("meta"):
        model = R.build_model(r, in_channels=1)
    assert R.input_crop(model, r.crop) == 572  # 388 output tiles need 572 input tiles


def test_unknown_recipe_field_suggests() -> None:
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        R.make_recipe(epoch=3)


def test_valid_padding_loss_crops_targets() -> None:
    r = R.make_recipe(target="semantic", loss="weighted_ce", model_options={"channels": (4, 8)})
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    mask = torch.zeros(2, 12, 12, dtype=torch.long)
    mask[:, 2:10, 2:10] = torch.randint(0, 2, (2, 8, 8))
    weight = torch.rand(2, 12, 12)
    loss = SegmentationLoss(r)(logits, {"mask": mask, "weight": weight})
    ref = SegmentationLoss(r)(
        logits, {"mask": mask[:, 2:10, 2:10], "weight": weight[:, 2:10, 2:10]}
    )
    torch.testing.assert_close(loss, ref)


def test_valid_padding_training_step_runs(tmp_path) -> None:
    r = R.make_recipe(
        "paper",
        model_options={"channels": (4, 8)},
        crop=16,
        epochs=1,
        samples_per_epoch=2,
        synthetic_train=2,
        synthetic_val=1,
        synthetic_size=61,  # 61 px has no valid size: validation is centre-cropped
    )
    result = R.train(r, tmp_path / "run", progress=False)
    assert (
        result.epochs_run == 1 and (tmp_path / "run" / "checkpoints" / "best.safetensors").exists()
    )


def test_recipe_name_and_model_preset_do_not_clash() -> None:
    r = R.make_recipe("modern", preset="small")  # recipe name, then the model's preset
    assert r.preset == "small" and r.loss == "dice_ce"


def test_deep_supervision_trains_through_the_recipe(tmp_path) -> None:
    r = R.make_recipe(
        "demo",
        model="unetpp",
        model_options={"channels": (4, 8, 16), "deep_supervision": True},
        epochs=1,
        samples_per_epoch=2,
        batch_size=2,
        crop=32,
        synthetic_train=2,
        synthetic_val=1,
        synthetic_size=48,
    )
    result = R.train(r, tmp_path / "run", progress=False)
    assert result.epochs_run == 1 and result.best_metric == result.best_metric  # not NaN
