"""Video-aware imputation: scenes of a sequence dataset, memory draws, the memory-conditioned
score network, the receiver's per-camera memory and the imputer that uses it."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import tiny_conv_net

from mvld.common.dataset import Scenes, read_scenes
from mvld.common.errors import ConfigError, DatasetError
from mvld.common.wire import FrameSetMessage, ViewRecord
from mvld.model.checkpoint import LatentStats
from mvld.model.score_net import ConvScoreNet, ScoreNetConfig, memory_features
from mvld.model.sde import VPSDE
from mvld.receiver.imputation import Imputer, ScoreNetEps
from mvld.receiver.ingest import PendingFrameSet
from mvld.receiver.memory import CameraMemory
from mvld.train.memory import SceneMemory

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (2, 4, 4)
DIM = 32


def _net(memory: bool, seed: int = 0) -> ConvScoreNet:
    return tiny_conv_net(memory=memory, seed=seed)


# ---------------------------------------------------------------- scenes of a dataset


def test_scenes_come_from_render_json_episodes(tmp_path: Path) -> None:
    (tmp_path / "render.json").write_text(
        json.dumps({"rig": {"fps": 10.0, "frames_per_episode": 4}})
    )
    scenes = read_scenes(tmp_path, [f"{i:06d}" for i in range(10)])
    assert scenes is not None and scenes.fps == 10.0
    assert scenes.scene.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert scenes.position().tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_scenes_declared_in_dataset_json(tmp_path: Path) -> None:
    stems = ["a1", "a2", "a3", "b1", "b2"]
    (tmp_path / "dataset.json").write_text(
        json.dumps({"sequence": {"fps": 30, "scene_starts": ["a1", "b1"]}})
    )
    scenes = read_scenes(tmp_path, stems)
    assert scenes is not None and scenes.fps == 30.0
    assert scenes.scene.tolist() == [0, 0, 0, 1, 1]
    assert read_scenes(tmp_path / "nothing", stems) is None, "no metadata: not a sequence"


@pytest.mark.parametrize(
    "sequence, message",
    [
        ({"scene_starts": []}, "positive"),
        ({"fps": 0}, "positive"),
        ({"fps": 10, "scene_starts": "a1"}, "list of stems"),
        ({"fps": 10, "scene_starts": ["zz"]}, "names no frame set"),
    ],
)
def test_malformed_sequences_are_refused(tmp_path: Path, sequence: dict, message: str) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"sequence": sequence}))
    with pytest.raises(DatasetError, match=message):
        read_scenes(tmp_path, ["a1", "a2"])


# ---------------------------------------------------------------- training draws


def test_memory_draws_stay_in_their_scene_and_say_their_age() -> None:
    scene = np.repeat(np.arange(5), 40)  # 5 scenes of 40 frames
    z = torch.arange(200, dtype=torch.float32)[:, None, None].expand(200, 3, 2).clone()
    present = torch.ones(200, 3, dtype=torch.bool)
    bank = SceneMemory(z, present, Scenes(10.0, scene), drop=0.25, max_age_s=2.0)
    index = torch.arange(200)
    draw = bank.draw(index, torch.Generator().manual_seed(0))
    kept = torch.isfinite(draw.age)
    assert not kept[index % 40 == 0].any(), "a scene's first frame has no past"
    source = draw.latents[..., 0].long()  # the remembered row, since z holds its row number
    frames = (index[:, None] - source)[kept]
    assert (frames >= 1).all() and (frames <= 20).all(), "1 frame up to max_age_s * fps"
    assert torch.equal(
        torch.from_numpy(scene)[source[kept]],
        torch.from_numpy(scene)[index[:, None].expand(200, 3)[kept]],
    )
    assert torch.allclose(draw.age[kept], frames.float() / 10.0)
    dropped = 1 - kept[index % 40 != 0].float().mean().item()
    assert 0.15 < dropped < 0.35, f"about drop=0.25 of the views have no memory: {dropped}"
    assert (draw.latents[~kept] == 0).all()


def test_memory_of_a_missing_view_is_none() -> None:
    z = torch.ones(20, 3, 2)
    present = torch.ones(20, 3, dtype=torch.bool)
    present[:, 1] = False
    bank = SceneMemory(z, present, Scenes(10.0, np.zeros(20, dtype=np.int64)), drop=0.0)
    draw = bank.draw(torch.arange(1, 20), torch.Generator().manual_seed(0))
    assert torch.isinf(draw.age[:, 1]).all() and torch.isfinite(draw.age[:, 0]).all()


# ---------------------------------------------------------------- the network


def test_a_memory_network_starts_as_the_memoryless_one() -> None:
    plain, aware = _net(False), _net(True)
    missing, unexpected = aware.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == [
        "memory_embed.bias",
        "memory_embed.weight",
        "memory_input.bias",
        "memory_input.weight",
    ]
    for module in (plain, aware):  # a non-zero output layer, so the outputs are not all 0
        torch.nn.init.normal_(module.output.weight, std=0.1)
    aware.output.load_state_dict(plain.output.state_dict())
    x, tau = torch.randn(4, 3, DIM), torch.rand(4, 3)
    memory, age = torch.randn(4, 3, DIM), torch.tensor([[0.5, float("inf"), 3.0]] * 4)
    assert torch.allclose(plain(x, tau), aware(x, tau, memory, age), atol=1e-6)
    torch.nn.init.normal_(aware.memory_input.weight, std=0.1)  # once trained, memory matters
    assert not torch.allclose(aware(x, tau, memory, age), aware(x, tau), atol=1e-4)
    assert torch.allclose(aware(x, tau), aware(x, tau, memory, torch.full((4, 3), torch.inf)))


def test_memory_features_saturate_at_the_horizon() -> None:
    features = memory_features(torch.tensor([[0.0, 1.0, 60.0, 600.0, float("inf")]]))
    assert features[0, :, 0].tolist() == [1, 1, 1, 1, 0]
    assert features[0, 0, 1] == 0 and features[0, 2, 1] == features[0, 3, 1] == 1
    assert 0 < features[0, 1, 1] < 1 and features[0, 4, 1] == 1


def test_memory_needs_the_conv_network() -> None:
    with pytest.raises(ConfigError, match="conv"):
        ScoreNetConfig(num_views=3, latent_dim=16, widths=(16,), memory=True)


# ---------------------------------------------------------------- the receiver's memory


def _pending(
    node: str,
    seq: int,
    t: float,
    present: list[bool],
    value: float,
    missing: tuple[str, str] = ("failed", "disconnected"),
) -> PendingFrameSet:
    """A frame set whose missing views have the status and reason ``missing``."""
    records = tuple(
        ViewRecord(
            f"cam{v}",
            "ok" if p else missing[0],
            "none" if p else missing[1],
            t - 0.01 if p else None,
            np.full(DIM, value, np.float32) if p else None,
        )
        for v, p in enumerate(present)
    )
    message = FrameSetMessage(node, seq, t, "f" * 64, records)
    latents = np.where(np.array(present)[:, None], value, 0).astype(np.float32)
    return PendingFrameSet(message, t, None, np.repeat(latents, DIM, 1), np.array(present), records)


def test_camera_memory_recalls_the_last_observed_latent_with_its_age() -> None:
    memory = CameraMemory(3, DIM, max_nodes=2)
    t0 = time.time()
    first = memory.recall([_pending("a", 0, t0, [True, True, True], 1.0)])
    assert np.isinf(first.age).all() and not first.any, "nothing seen yet"
    batch = [
        _pending("a", 1, t0 + 1, [True, False, True], 2.0),
        _pending("a", 2, t0 + 2, [True, False, False], 3.0),
    ]
    recall = memory.recall(batch)
    assert recall.latents[0, 1, 0] == 1.0 and recall.age[0, 1] == pytest.approx(1.01)
    assert recall.latents[1, 2, 0] == 2.0, "the batch's earlier frame set is remembered"
    assert recall.age[1, 1] == pytest.approx(2.01) and recall.age[1, 2] == pytest.approx(1.01)
    restarted = memory.recall([_pending("a", 0, t0 + 3, [False, True, True], 4.0)])
    assert np.isinf(restarted.age).all() and memory.restarts == 1, "a restart forgets"
    memory.recall([_pending("b", 0, t0, [True] * 3, 1.0)])
    memory.recall([_pending("c", 0, t0, [True] * 3, 1.0)])
    assert len(memory) == 2, "bounded: the least recently seen node is forgotten"
    assert np.isinf(memory.recall([_pending("a", 5, t0 + 9, [False] * 3, 0)]).age).all()


@pytest.mark.parametrize(
    ("status", "reason", "recalled"),
    [
        ("obstructed", "occluded", 4.0),  # sent while the cover was being confirmed: passed over
        ("failed", "black", 4.0),
        ("failed", "disconnected", 14.0),  # the source stopped: its last frames were good
        ("withheld", "policy", 14.0),
    ],
)
def test_a_picture_fault_recalls_the_view_from_before_its_confirmation(
    status: str, reason: str, recalled: float
) -> None:
    memory = CameraMemory(3, DIM, guard_frames=10)
    t0 = time.time()
    for seq in range(15):  # camera 1 observed with latents 0..14
        memory.recall([_pending("a", seq, t0 + seq, [True] * 3, float(seq))])
    fault = _pending("a", 15, t0 + 15, [True, False, True], 15.0, (status, reason))
    recall = memory.recall([fault])
    assert recall.latents[0, 1, 0] == recalled
    assert recall.age[0, 1] == pytest.approx(15 - recalled + 0.01)
    assert recall.latents[0, 0, 0] == 14.0, "an observed camera's memory is its newest frame"
    short = CameraMemory(3, DIM, guard_frames=10)
    for seq in range(5):
        short.recall([_pending("b", seq, t0 + seq, [True] * 3, float(seq))])
    early = short.recall([_pending("b", 5, t0 + 5, [True, False, True], 5.0, (status, reason))])
    assert np.isinf(early.age[0, 1]) == (recalled == 4.0), "too few frames before a fault"


def test_the_imputer_uses_memory_only_with_a_video_aware_network() -> None:
    stats = LatentStats(torch.zeros(3, DIM), torch.ones(3, DIM))
    aware = _net(True)
    torch.nn.init.normal_(aware.memory_input.weight, std=0.5)
    torch.nn.init.normal_(aware.output.weight, std=0.1)
    latents, present = torch.randn(2, 3, DIM), torch.tensor([[True, False, True]] * 2)
    memory, age = torch.randn(2, 3, DIM), torch.tensor([[0.1, 0.5, 0.1]] * 2)
    imputer = Imputer(ScoreNetEps(aware), stats, VPSDE(), steps=10)
    assert imputer.uses_memory
    with_memory = imputer(latents, present, memory=memory, memory_age=age).latents
    without = imputer(latents, present).latents
    assert torch.equal(with_memory[present], latents[present]), "observed views untouched"
    assert not torch.allclose(with_memory[:, 1], without[:, 1], atol=1e-3)
    plain = Imputer(ScoreNetEps(_net(False)), stats, VPSDE(), steps=10)
    assert not plain.uses_memory
    assert torch.equal(
        plain(latents, present, memory=memory, memory_age=age).latents,
        plain(latents, present).latents,
    ), "a memoryless model ignores it"


def test_row_seeds_give_a_frame_set_the_same_noise_in_any_batch() -> None:
    stats = LatentStats(torch.zeros(3, DIM), torch.ones(3, DIM))
    net = _net(False)
    torch.nn.init.normal_(net.output.weight, std=0.1)
    imputer = Imputer(ScoreNetEps(net), stats, VPSDE(), steps=10)
    latents, present = torch.randn(3, 3, DIM), torch.tensor([[True, False, True]] * 3)
    together = imputer(latents, present, seed=[7, 8, 9]).latents
    alone = imputer(latents[1:2], present[1:2], seed=[8]).latents
    assert (together[1] - alone[0]).abs().max() < 1e-3, "row 1 does not see its batch"
    assert not torch.allclose(together[0, 1], together[1, 1], atol=1e-3), "seeds differ"
    twice = imputer(latents, present, samples=2, seed=[7, 8, 9]).samples
    assert not torch.allclose(twice[:, 0], twice[:, 1], atol=1e-3), "K samples differ"
