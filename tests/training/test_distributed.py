"""torch.distributed helpers in one process, and a real 2-process torchrun (gloo) training."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import trainer_toy  # registered by conftest.py

import unetkit
from unetkit.formats.checkpoint import load_state, save_state
from unetkit.training import distributed
from unetkit.training.logging import RunDirectory

TOY = Path(trainer_toy.__file__)


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def test_single_process_defaults(no_torchrun: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not distributed.is_torchrun()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.init_from_env() is False
    distributed.barrier()  # no-op, must not hang
    assert distributed.all_reduce_sums({"b": torch.tensor(2.0), "a": 1}) == {"a": 1.0, "b": 2.0}
    assert distributed.broadcast_flag(True) is True
    # a torchrun world of one process needs no process group either
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.is_torchrun() and distributed.init_from_env() is False
    assert not distributed.is_initialized()


def test_torchrun_env_is_read_before_the_group_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (3, 4, 1)
    assert not distributed.is_main()
    assert distributed.log_main("quiet on rank 3") is None


def test_shard_sampler_partitions_without_padding() -> None:
    data = list(range(7))
    shards = [list(distributed.ShardSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(distributed.ShardSampler(data, num_replicas=3, rank=r)) for r in range(3)] == [
        3,
        2,
        2,
    ]


def test_train_sampler_order_depends_only_on_seed_and_epoch(no_torchrun: None) -> None:
    data = list(range(10))
    sampler = distributed.train_sampler(data, seed=5)
    sampler.set_epoch(3)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5 + 3)).tolist()
    assert list(sampler) == expected
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(sampler) == expected


def test_maybe_no_sync_only_wraps_ddp_like_models() -> None:
    entered = []

    class FakeDDP(nn.Module):
        def no_sync(self):
            entered.append(True)
            return contextlib.nullcontext()

    with distributed.maybe_no_sync(nn.Linear(1, 1), True):
        pass
    with distributed.maybe_no_sync(FakeDDP(), False):
        pass
    assert entered == []
    with distributed.maybe_no_sync(FakeDDP(), True):
        pass
    assert entered == [True]


def test_wrap_ddp_is_identity_without_group(no_torchrun: None) -> None:
    net = nn.Linear(2, 2)
    assert distributed.wrap_ddp(net, torch.device("cpu")) is net


def test_rng_state_round_trips_through_a_state_file(tmp_path: Path) -> None:
    distributed.seed_everything(7)
    saved = distributed.capture_rng_state()
    save_state(tmp_path / "s.safetensors", {"rng": saved})
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    distributed.seed_everything(99)
    distributed.restore_rng_state(load_state(tmp_path / "s.safetensors")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_epoch_seed_separates_seed_epoch_and_rank() -> None:
    seeds = {distributed.epoch_seed(s, e, r) for s in range(3) for e in range(3) for r in range(3)}
    assert len(seeds) == 27
    assert distributed.epoch_seed(1, 2, 3) == distributed.epoch_seed(1, 2, 3)
    assert all(0 <= x < 2**63 for x in seeds)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    run_dir, hashes = tmp_path / "ddp", tmp_path / "hashes"
    hashes.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # the CPU/gloo path
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(TOY),
        str(run_dir),
        "--epochs",
        "3",
        "--batch-size",
        "2",
        "--optimizer",
        "sgd",
        "--threads",
        "1",
        "--hash-dir",
        str(hashes),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the replicas ended bit-identical, and rank 0 alone wrote the run directory
    rank_hashes = [(hashes / f"rank{r}.txt").read_text() for r in range(2)]
    assert rank_hashes[0] == rank_hashes[1]

    last = unetkit.load(run_dir / "checkpoints" / "last.safetensors")
    assert trainer_toy.weights_hash(last) == rank_hashes[0]
    assert RunDirectory(run_dir).read_config()["fit"]["world_size"] == 2
    ddp_rows = RunDirectory(run_dir).read_metrics()
    assert [r["epoch"] for r in ddp_rows] == [1, 2, 3]
    assert [r["step"] for r in ddp_rows] == [4, 8, 12]  # 16 samples / (2 ranks x 2) per step

    # 2 ranks x batch 2 see the same samples per step as 1 process x batch 4 (sampler order
    # is a function of (seed, epoch)), and DDP averages their gradients: same training
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, result = trainer_toy.run(tmp_path / "single", 3, batch_size=4, optimizer="sgd")
    finally:
        torch.set_num_threads(threads)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(last.state_dict()[k], v, rtol=0, atol=1e-5, msg=k)
    # validation shards (3 + 2 samples) are summed over ranks exactly once each
    for ddp_row, row in zip(ddp_rows, result.history, strict=True):
        assert ddp_row["train/loss"] == pytest.approx(row["train/loss"], abs=1e-5)
        assert ddp_row["val/loss"] == pytest.approx(row["val/loss"], abs=1e-5)
        assert ddp_row["val/accuracy"] == pytest.approx(row["val/accuracy"], abs=1e-3)
