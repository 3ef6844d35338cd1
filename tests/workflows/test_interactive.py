"""The front-ends' shared workflow: segment an array, fine-tune on corrected labels."""

from __future__ import annotations

import numpy as np
import pytest

from unetkit.data.io import read_image, to_float_image
from unetkit.data.synthetic import write_synthetic_folder
from unetkit.errors import DataError
from unetkit.inference import TileOptions
from unetkit.segmentation.metrics import dice
from unetkit.workflows import segment_train as R
from unetkit.workflows.interactive import Cancelled, Segmenter, finetune_on_labels
from unetkit.workflows.segment import InferenceOptions, load_for_inference, predict_image


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("interactive")
    write_synthetic_folder(root / "data", 4, shape=(48, 48), seed=3)
    recipe = R.make_recipe(
        "modern", data=str(root / "data"), model_options={"channels": (4, 8)},
        epochs=1, batch_size=2, crop=32, samples_per_epoch=4,
    )
    R.train(recipe, root / "base", progress=False)
    image = read_image(sorted((root / "data" / "images").iterdir())[0])
    truth = read_image(sorted((root / "data" / "masks").iterdir())[0])
    return root, image, truth


def test_segment_equals_the_predict_engine(run):
    root, image, truth = run
    seg = Segmenter(root / "base")
    res = seg.segment(image, precision="fp32")
    model, meta = load_for_inference(root / "base" / "checkpoints" / "best.safetensors")
    ref = predict_image(model, to_float_image(image), meta, InferenceOptions(precision="fp32"))
    np.testing.assert_array_equal(res.instances, ref.instances)
    assert res.count == len(np.unique(ref.instances[ref.instances > 0]))  # objects, not 0
    assert res.overlay.shape == (*image.shape[:2], 3) and res.overlay.dtype == np.uint8
    # channels-first and channels-last colour input both reach a grey model as the mean
    rgb = np.stack([image] * 3, -1)
    np.testing.assert_array_equal(seg.segment(rgb, precision="fp32").instances, res.instances)


def test_segment_reports_tile_progress_and_stops_when_it_raises(run):
    root, image, _ = run
    seg = Segmenter(root / "base")
    calls = []
    tiles = TileOptions(tile=16)
    seg.segment(image, tiles=tiles, precision="fp32", progress=lambda d, t: calls.append((d, t)))
    total = calls[-1][1]
    assert total > 1 and calls[-1][0] == total
    assert [d for d, _ in calls] == sorted({d for d, _ in calls})  # increasing

    def stop(done: int, total: int) -> None:
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        seg.segment(image, tiles=TileOptions(tile=16), precision="fp32", progress=stop)


def test_bad_images_are_one_clear_error(run):
    root, _, _ = run
    seg = Segmenter(root / "base")
    with pytest.raises(DataError, match="^image: .*shape"):
        seg.segment(np.zeros((5, 4, 4, 4)))
    with pytest.raises(DataError, match="^image: .*no channel axis"):
        seg.segment(np.zeros((16, 16, 7)))


def test_finetune_learns_the_corrections(run, tmp_path):
    root, image, truth = run
    seg = Segmenter(root / "base")
    before = seg.segment(image, precision="fp32")
    # the corrections: the true cells, which the barely trained base misses
    fixed = truth.astype(np.int32)
    losses = []
    adapter = finetune_on_labels(
        root / "base", [image], [fixed], tmp_path / "ft", steps=30, rank=4, lr=3e-2,
        progress=lambda step, total, loss: losses.append((step, total, loss)),
    )
    assert [s for s, _, _ in losses] == list(range(1, 31)) and losses[-1][1] == 30
    after = Segmenter(adapter).segment(image, precision="fp32")
    d_before = dice(before.labels > 0, fixed > 0, num_classes=2).mean
    d_after = dice(after.labels > 0, fixed > 0, num_classes=2).mean
    assert d_after > d_before + 0.1


def test_finetune_can_be_cancelled(run, tmp_path):
    root, image, truth = run
    fixed = truth.astype(np.int32)
    calls = []
    with pytest.raises(Cancelled):
        finetune_on_labels(
            root / "base", [image], [fixed], tmp_path / "ft", steps=50,
            should_stop=lambda: len(calls) >= 3,
            progress=lambda *a: calls.append(a),
        )
    assert len(calls) == 3
