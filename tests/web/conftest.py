"""Fixtures for the web page tests: a tiny trained segmentation run, a tiny diffusion
checkpoint (random weights, the packaged MiniLM text encoder) and synthetic images."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/seg`` (a run folder), ``root/diffusion.safetensors`` and ``root/data``."""
    import unetkit
    from unetkit.data.synthetic import write_synthetic_folder
    from unetkit.diffusion.schedules import NoiseSchedule
    from unetkit.formats.checkpoint import save
    from unetkit.workflows import segment_train as R

    root = tmp_path_factory.mktemp("web_models")
    write_synthetic_folder(root / "data", 4, shape=(64, 64), seed=3)
    recipe = R.make_recipe(
        "modern",
        data=str(root / "data"),
        model_options={"channels": (4, 8)},
        epochs=2,  # enough steps that the model finds separate cells (not one blob)
        batch_size=2,
        crop=32,
        samples_per_epoch=32,
    )
    R.train(recipe, root / "seg", progress=False)
    model = unetkit.create_model(
        "diffusion-unet",
        in_channels=1,
        out_channels=1,
        channels=(8, 16),
        num_res_blocks=1,
        attention_levels=(False, True),
        num_heads=2,
        cross_attention_dim=384,  # the packaged MiniLM's width
        norm_groups=4,
    )
    schedule = NoiseSchedule(num_train_timesteps=1000)
    meta = {
        "diffusion": {
            "schedule": schedule.to_dict(),
            "text_encoder": "minilm",
            "max_length": 8,
            "image_size": 16,
            "channels": 1,
            "sampler": "ddim",
            "clip_sample": True,
            "prompts": [],
        }
    }
    save(model, root / "diffusion.safetensors", extra=meta)
    return root


@pytest.fixture(scope="session")
def cell_images(models_root: Path) -> list[Path]:
    return sorted((models_root / "data" / "images").iterdir())
