"""Two processes under torchrun (gloo, CPU) follow the same run as one process.

Every rank draws the same global batch and keeps its half, and DDP averages gradients, so
two ranks with half batches must end with the weights of one process with the full batch.
The score network starts with a zero output layer, so after its first step the inner layers
see gradients near zero that Adam rescales to full steps: float summation order then shows
up quickly, and its comparison stops after two steps.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import tiny_ae_config, tiny_score_config, write_tiny_rig
from safetensors.torch import load_file

from mvld.train.autoencoder_training import train_autoencoder
from mvld.train.distributed import DistributedContext
from mvld.train.score_training import train_score

CPU = DistributedContext(device=torch.device("cpu"))


def _torchrun(args: list[str], cwd: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mvld.train.cli",
        *args,
        "--threads",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def _assert_same_weights(a: Path, b: Path) -> None:
    """Equal up to summation order: Adam rescales near-zero gradients, so a few elements
    (well under 1%) may differ by up to a few learning-rate steps; the rest agree to 1e-5."""
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    diffs = torch.cat([(first[name] - second[name]).abs().flatten() for name in first])
    assert (diffs > 1e-5).float().mean() < 0.01, (diffs > 1e-5).float().mean()
    assert diffs.max() < 5e-3, diffs.max()


def _flags(config) -> list[str]:
    flags = []
    for name, value in vars(config).items():
        if name in ("progress", "resume", "skip_bad"):
            continue
        if isinstance(value, bool):  # a switch: --name or --no-name
            flags.append(("--" if value else "--no-") + name.replace("_", "-"))
            continue
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        flags += ["--" + name.replace("_", "-"), shown]
    return [*flags, "--no-progress"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ae", "score"])
def test_two_gloo_ranks_match_one_process(stage: str, tmp_path: Path) -> None:
    data = write_tiny_rig(tmp_path / "data", count=48)
    ae_single = train_autoencoder(tiny_ae_config(data, tmp_path / "ae1", steps=12), CPU)
    if stage == "ae":
        config = tiny_ae_config(data, tmp_path / "ae2", steps=12)
        single = ae_single
    else:
        single = train_score(tiny_score_config(data, ae_single, tmp_path / "s1", steps=2), CPU)
        config = tiny_score_config(data, ae_single, tmp_path / "s2", steps=2)
    _torchrun([stage, *_flags(config)], cwd=tmp_path)
    _assert_same_weights(single.with_suffix(".safetensors"), Path(config.out) / "last.safetensors")


def test_each_rank_keeps_its_own_slice_of_the_global_batch() -> None:
    batch = torch.arange(8)
    slices = [DistributedContext(torch.device("cpu"), rank, 2).shard(batch) for rank in (0, 1)]
    assert torch.equal(torch.cat(slices), batch) and len(slices[0]) == 4
