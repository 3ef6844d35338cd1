"""scheduler_config.json -> our samplers; pipeline-folder checks (no diffusers needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unetkit.diffusion.samplers import build_scheduler
from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.errors import CheckpointError, ConfigError
from unetkit.formats.sd_files import check_pipeline_dir, sampler_from_config

SD15_PNDM = {  # stable-diffusion-v1-5's scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def test_scheduler_files_map_to_our_samplers_with_their_options() -> None:
    name, opts, note = sampler_from_config(SD15_PNDM)
    assert name == "ddim" and "PNDMScheduler is not implemented" in note
    assert opts["steps_offset"] == 1 and opts["set_alpha_to_one"] is False
    sched = build_scheduler(name, NoiseSchedule.from_diffusers_config(SD15_PNDM), **opts)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [751, 501, 251, 1]  # SD's leading spacing, offset 1
    # diffusers' defaults where the file is silent (DDIM: clip_sample and alpha-to-one on)
    name, opts, note = sampler_from_config({"_class_name": "DDIMScheduler"})
    assert (name, opts["clip_sample"], opts["set_alpha_to_one"], note) == ("ddim", True, True, None)
    euler = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"}
    assert sampler_from_config(euler)[:2] == (
        "euler",
        {"timestep_spacing": "trailing", "steps_offset": 0},
    )
    dpm = {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 1}
    assert sampler_from_config(dpm)[1]["order"] == 1
    # --sampler overrides the class; the file's options are read with the new class's
    # defaults, as diffusers' EulerDiscreteScheduler.from_config(pndm_config) does
    name, opts, _ = sampler_from_config(SD15_PNDM, "euler")
    assert name == "euler" and opts == {"timestep_spacing": "linspace", "steps_offset": 1}
    opts = sampler_from_config({**SD15_PNDM, "timestep_spacing": "leading"}, "euler")[1]
    assert opts["timestep_spacing"] == "leading"
    with pytest.raises(ConfigError, match="'UniPCMultistepScheduler' is not supported"):
        sampler_from_config({"_class_name": "UniPCMultistepScheduler"})


def test_pipeline_folder_missing_parts_are_one_line(tmp_path: Path) -> None:
    for part, file in [("unet", "config.json"), ("scheduler", "scheduler_config.json")]:
        (tmp_path / part).mkdir()
        (tmp_path / part / file).write_text(json.dumps({}))
    with pytest.raises(CheckpointError) as e:
        check_pipeline_dir(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "missing vae/config.json, text_encoder/config.json, " in msg
    assert "tokenizer/vocab.json" in msg and "found ['scheduler', 'unet']" in msg
    with pytest.raises(CheckpointError, match="no such pipeline folder"):
        check_pipeline_dir(tmp_path / "nope")
