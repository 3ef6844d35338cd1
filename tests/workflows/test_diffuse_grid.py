"""DiffusionPipeline.sample_grid (the end-of-epoch sample grid) shows a progress bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.registry import create_model
from unetkit.workflows.diffuse import DiffusionPipeline


def test_sample_grid_progress(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    net = create_model(
        "diffusion-unet", preset="tiny", in_channels=1, out_channels=1, cross_attention_dim=None
    )
    pipe = DiffusionPipeline(net, NoiseSchedule(), None, size=8, channels=1, precision="fp32")
    path = pipe.sample_grid(["a", "b"], tmp_path / "g.png", per_prompt=2, steps=3, guidance=1.0,
                            progress=True)  # fmt: skip
    assert np.asarray(Image.open(path)).shape == (2 * 10 + 2, 2 * 10 + 2)
    err = capsys.readouterr().err
    assert "sample grid" in err and "3/3" in err
    pipe.sample_grid(["a"], tmp_path / "h.png", per_prompt=1, steps=2, guidance=1.0)
    assert "sample grid" not in capsys.readouterr().err  # off unless asked
