"""bioimage.io packages: bioimageio.core's own test passes on the export (ONNX and state
dict), fails on tampered weights; predict runs a package; LoRA exports merged."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import unetkit
from unetkit.cli.main import main
from unetkit.data.synthetic import write_synthetic_folder
from unetkit.errors import CheckpointError

pytest.importorskip("bioimageio.core")
pytest.importorskip("onnxruntime")

from unetkit.formats.bioimageio import PackageInfo, export_package  # noqa: E402
from unetkit.formats.bioimageio_load import check_package, load_package  # noqa: E402

CITE = ("Doe et al. 2024, Tiny cells", "10.5281/zenodo.1234567")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A barely trained boundary-target run on synthetic cells (seconds)."""
    from unetkit.workflows import segment_train as R

    root = tmp_path_factory.mktemp("bio")
    write_synthetic_folder(root / "data", 3, shape=(48, 48), seed=3)
    recipe = R.make_recipe(
        "modern",
        data=str(root / "data"),
        model_options={"channels": (4, 8)},
        epochs=1,
        batch_size=2,
        crop=32,
        samples_per_epoch=4,
    )
    R.train(recipe, root / "run", progress=False)
    return root


@pytest.fixture(scope="module")
def package(run: Path) -> Path:
    target = run / "pkg" / "cells.zip"
    argv = ["export", str(run / "run" / "checkpoints" / "best.safetensors")]
    argv += ["--bioimageio", str(target), "--authors", "Ada Lovelace", "Alan Turing"]
    argv += ["--license", "MIT", "--cite", *CITE, "--tags", "nuclei"]
    argv += ["--test-image", str(sorted((run / "data" / "images").iterdir())[0])]
    assert main(argv) == 0
    return target


def _details(summary) -> dict[str, str]:
    return {d.name: d.status for d in summary.details}


def test_export_passes_bioimageio_core_test(package: Path) -> None:
    import yaml

    summary = check_package(package)
    details = _details(summary)
    assert summary.status == "passed", [d for d in summary.details if d.status != "passed"]
    for weights in ("onnx", "pytorch_state_dict"):  # both formats reproduce the test output
        assert details[f"Reproduce test outputs from test inputs ({weights})"] == "passed"
    with zipfile.ZipFile(package) as z:
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        names = set(z.namelist())
    assert {"weights.onnx", "weights.pt", "cover.png", "test_input.npy"} <= names
    with zipfile.ZipFile(package) as z:  # --test-image: one of the run's 48×48 images
        assert np.load(io.BytesIO(z.read("test_input.npy"))).shape == (1, 1, 48, 48)
    assert rdf["format_version"].startswith("0.5")
    assert [a["name"] for a in rdf["authors"]] == ["Ada Lovelace", "Alan Turing"]
    assert rdf["license"] == "MIT" and CITE[1] in [c.get("doi") for c in rdf["cite"]]
    assert "nuclei" in rdf["tags"]
    steps = [p["id"] for p in rdf["inputs"][0]["preprocessing"]]
    normalize = unetkit.read_metadata(package.parent.parent / "run/checkpoints/best.safetensors")
    spec_step = {"zscore": "zero_mean_unit_variance", "percentile": "scale_range"}
    assert spec_step[normalize["normalize"]] in steps  # the run's own normalisation
    assert [p["id"] for p in rdf["outputs"][0]["postprocessing"]][0] == "softmax"
    assert [a.get("id", a["type"]) for a in rdf["inputs"][0]["axes"]] == [
        "batch",
        "channel",
        "y",
        "x",
    ]
    arch = rdf["weights"]["pytorch_state_dict"]["architecture"]
    assert arch["import_from"] == "unetkit.formats.bioimageio" and arch["kwargs"]["model"] == "unet"
    assert rdf["config"]["unetkit"]["target"] == "boundary"
    assert (
        "synthetic" in rdf["training_data"]["description"]
        or "data/" in (rdf["training_data"]["description"])
    )


def _rewrite(package: Path, target: Path, replace: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, replace.get(item.filename, src.read(item.filename)))
    return target


def _perturbed_state_dict(package: Path) -> bytes:
    with zipfile.ZipFile(package) as z:
        state = torch.load(io.BytesIO(z.read("weights.pt")), weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    state[key] = state[key] * -1.5
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_tampered_weights_fail_the_test(package: Path, tmp_path: Path) -> None:
    tampered = _perturbed_state_dict(package)
    # 1) a changed weights file under the old checksum
    bad = _rewrite(package, tmp_path / "bad_sha.zip", {"weights.pt": tampered})
    assert check_package(bad, weight_format="pytorch_state_dict").status == "failed"
    with pytest.raises(CheckpointError, match="sha256"):
        load_package(bad)
    # 2) the checksum updated too: the reproduction of the test output catches it
    with zipfile.ZipFile(package) as z:
        rdf = z.read("rdf.yaml").decode()
        old = hashlib.sha256(z.read("weights.pt")).hexdigest()
    rdf = rdf.replace(old, hashlib.sha256(tampered).hexdigest())
    bad2 = _rewrite(
        package, tmp_path / "bad_out.zip", {"weights.pt": tampered, "rdf.yaml": rdf.encode()}
    )
    summary = check_package(bad2, weight_format="pytorch_state_dict")
    assert summary.status != "passed"  # bioimageio.core says "valid-format": format only
    details = _details(summary)
    assert details["Reproduce test outputs from test inputs (pytorch_state_dict)"] == "failed"


def _counts(folder: Path) -> list[dict[str, str]]:
    with open(folder / "counts.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "image"} for r in csv.DictReader(f)]


def test_predict_runs_a_package_like_its_checkpoint(run: Path, package: Path, tmp_path: Path):
    from unetkit.data.io import read_image

    images = run / "data" / "images"
    ckpt = run / "run" / "checkpoints" / "best.safetensors"
    outs = {}
    for name, source, extra in (
        ("ckpt", ckpt, []),
        ("zip", package, []),
        ("onnx", package, ["--backend", "onnx"]),
    ):
        outs[name] = tmp_path / name
        argv = ["predict", str(source), str(images), "--out", str(outs[name])]
        assert main([*argv, "--precision", "fp32", *extra]) == 0
    assert _counts(outs["zip"]) == _counts(outs["ckpt"])
    for f in sorted(outs["ckpt"].glob("*_instances.png")):
        want = read_image(f)
        np.testing.assert_array_equal(read_image(outs["zip"] / f.name), want)
        # onnxruntime sums in another order: at most a few border pixels may flip
        assert (read_image(outs["onnx"] / f.name) == want).mean() > 0.99


def test_evaluate_and_interactive_segmenter_open_a_package(
    run: Path, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unetkit.data.io import read_image
    from unetkit.workflows.interactive import Segmenter

    image = read_image(sorted((run / "data" / "images").iterdir())[0])
    want = Segmenter(run / "run").segment(image, precision="fp32")
    got = Segmenter(package).segment(image, precision="fp32")
    np.testing.assert_array_equal(got.instances, want.instances)
    assert main(["evaluate", str(package), "--data", str(run / "data")]) == 0
    assert "dice" in capsys.readouterr().out.lower()


@pytest.mark.slow
def test_lora_adapter_exports_merged(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unetkit.formats.lora_files import save_adapter
    from unetkit.nn.lora_inject import inject_lora, lora_layers, merge_and_unload

    ckpt = run / "run" / "checkpoints" / "best.safetensors"
    model = unetkit.load(ckpt)
    inject_lora(model, ["attn+ff+conv"], r=2)
    torch.manual_seed(1)
    for layer in lora_layers(model).values():  # non-zero B: the adapter changes the output
        for p in layer.lora_B.parameters():
            torch.nn.init.normal_(p, std=0.2)
    adapter = save_adapter(
        model, tmp_path / "a.safetensors", targets=["attn+ff+conv"], base_model=str(ckpt)
    )
    target = tmp_path / "lora.zip"
    argv = ["export", str(adapter), "--bioimageio", str(target), "--authors", "Ada", "--check"]
    assert main(argv) == 0
    assert "bioimageio.core test passed" in capsys.readouterr().out
    loaded, meta = load_package(target)
    assert not any("lora" in k for k in loaded.state_dict())
    merged = merge_and_unload(model).eval()
    x = torch.randn(1, 1, 40, 36)
    with torch.inference_mode():
        want = merged(x)
        base = unetkit.load(ckpt)(x)
        torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-4)
        assert (want - base).abs().max() > 1e-2  # the adapter is really in there
    assert meta["target"] == "boundary"


@pytest.mark.slow
def test_valid_padding_multichannel_percentile_package(tmp_path: Path) -> None:
    model = unetkit.create_model(
        "unet", channels=(4, 8), padding="valid", in_channels=2, out_channels=1
    )
    info = PackageInfo("valid two channel", "A tiny valid-padding model.", ("Ada",))
    meta = {"normalize": "percentile", "normalize_percentiles": [2.0, 99.8]}
    target = export_package(model, meta, tmp_path / "v.zip", info)
    summary = check_package(target)
    assert summary.status == "passed", [d for d in summary.details if d.status != "passed"]
    import yaml

    with zipfile.ZipFile(target) as z:
        rdf = yaml.safe_load(z.read("rdf.yaml"))
    y_out = rdf["outputs"][0]["axes"][2]["size"]
    assert y_out["offset"] < 0  # valid padding: the output is smaller than the input
    assert [p["id"] for p in rdf["outputs"][0]["postprocessing"]][0] == "sigmoid"
    kwargs = next(
        p["kwargs"] for p in rdf["inputs"][0]["preprocessing"] if p["id"] == "scale_range"
    )
    assert (kwargs["min_percentile"], kwargs["max_percentile"]) == (2.0, 99.8)
    assert load_package(target)[1]["normalize_percentiles"] == [2.0, 99.8]


@pytest.mark.slow
def test_3d_package(tmp_path: Path) -> None:
    model = unetkit.create_model("unet", channels=(4, 8), dims=3, out_channels=3)
    info = PackageInfo("tiny volume", "A tiny 3-D model.", ("Ada",))
    target = export_package(model, {"normalize": "zscore"}, tmp_path / "v.zip", info)
    assert check_package(target).status == "passed"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "{ckpt}", "--bioimageio", "{tmp}/x.zip"], "--authors"),
        (["predict", "{tmp}/plain.zip", "{tmp}", "--out", "{tmp}/o"], "no rdf.yaml"),
        (["predict", "{tmp}/missing.zip", "{tmp}", "--out", "{tmp}/o"], "no such"),
        (["predict", "{tmp}/foreign.zip", "{tmp}", "--out", "{tmp}/o"], "not a unetkit model"),
    ],
)
def test_bad_input_is_one_line(
    run: Path,
    package: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as z:
        z.writestr("readme.txt", "not a model")
    with zipfile.ZipFile(package) as z:
        rdf = z.read("rdf.yaml").decode()
    foreign = re.sub(r"import_from: \S+", "import_from: someone.elses.models", rdf)
    _rewrite(package, tmp_path / "foreign.zip", {"rdf.yaml": foreign.encode()})
    ckpt = run / "run" / "checkpoints" / "best.safetensors"
    args = [a.format(ckpt=ckpt, tmp=tmp_path) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
