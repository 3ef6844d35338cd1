"""Training on picked channels of multi-channel OME-TIFFs: the checkpoint records the
channels and the pixel size, and predict reads new inputs the same way."""

from __future__ import annotations

import numpy as np
import tifffile

from unetkit.data.synthetic import synth_cells
from unetkit.formats.checkpoint import read_metadata
from unetkit.workflows import segment_train as R
from unetkit.workflows.segment_files import predict_files, trained_channels


def _two_channel_folder(root, n=3, size=48):
    """images/: CYX OME-TIFFs whose channel 1 holds the cells, channel 0 only noise."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        image, labels = synth_cells((size, size), seed=i)
        noise = rng.random((size, size)).astype(np.float32)
        stack = np.stack([noise, image.astype(np.float32)])
        tifffile.imwrite(
            root / "images" / f"c{i}.ome.tif", stack, metadata={"axes": "CYX",
            "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65}, ome=True,
        )
        tifffile.imwrite(root / "masks" / f"c{i}.ome.tif", labels.astype(np.uint16))
    return root


def test_channels_and_pixel_size_travel_from_training_to_predict(tmp_path):
    data = _two_channel_folder(tmp_path / "data")
    recipe = R.make_recipe(
        "modern", data=str(data), channels=(1,), model_options={"channels": (4, 8)},
        epochs=1, steps_per_epoch=2, batch_size=2, crop=32,
    )
    R.train(recipe, tmp_path / "run", progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "best.safetensors"
    meta = read_metadata(ckpt)
    assert trained_channels(meta) == (1,)
    assert abs(meta["pixel_size"] - 0.65) < 1e-6
    # a 2-channel input to the 1-channel model: the recorded channel is picked, no flag needed
    rows = predict_files(ckpt, [data / "images" / "c0.ome.tif"], tmp_path / "pred")
    assert len(rows) == 1
