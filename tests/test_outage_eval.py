"""Video-aware training and the camera-outage evaluation end to end on a tiny sequence dataset:
a memory score network trains on scenes, and `mvld-eval --outages` scores it against
memoryless imputation and hold-last on held-out outages."""

import json
from pathlib import Path

import pytest
import torch
from model_fixtures import tiny_ae_config, tiny_score_config, write_tiny_rig

from mvld.common.errors import DatasetError
from mvld.model.checkpoint import load_mvld_model
from mvld.train.autoencoder_training import train_autoencoder
from mvld.train.distributed import DistributedContext
from mvld.train.eval_cli import main as eval_main
from mvld.train.score_training import train_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = DistributedContext(device=torch.device("cpu"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("outages")
    data = write_tiny_rig(root / "data", count=80, drop_every=0)
    (data / "dataset.json").write_text(
        json.dumps({"sequence": {"fps": 4, "scene_starts": ["000000", "000040"]}})
    )
    ae = train_autoencoder(tiny_ae_config(data, root / "ae", latent_channels=2, latent_dim=32), CPU)
    return data, train_score(_video_net(data, ae, root / "score"), CPU)


def _video_net(data: Path, ae: Path, out: Path, **overrides):
    """A tiny video-aware conv score network's training run on a sequence dataset."""
    values = dict(kind="conv", widths=(16, 16), attention_heads=0, memory=True)
    return tiny_score_config(data, ae, out, memory_max_age_s=5.0, **(values | overrides))


@pytest.fixture(scope="module")
def trained_with_prior(tmp_path_factory, trained) -> Path:
    """A video-aware network with a regression prior (so also a memory prior), on the same data."""
    data, _ = trained
    root = tmp_path_factory.mktemp("outages_prior")
    ae = train_autoencoder(
        tiny_ae_config(data, root / "ae", latent_channels=2, latent_dim=32, steps=2), CPU
    )
    return train_score(_video_net(data, ae, root / "score", prior=True, steps=4), CPU)


def test_a_video_aware_network_trains_on_scenes(trained) -> None:
    _, score = trained
    model = load_mvld_model(score)
    assert model.score_net.config.memory
    metrics = json.loads(score.with_suffix(".json").read_text())["metrics"]
    assert {"val_cond", "val_cond_no_memory"} <= set(metrics)


def test_memory_training_refuses_a_dataset_without_order(tmp_path: Path, trained) -> None:
    data = write_tiny_rig(tmp_path / "plain", count=40, drop_every=0)
    ae = train_autoencoder(
        tiny_ae_config(data, tmp_path / "ae", latent_channels=2, latent_dim=32, steps=2), CPU
    )
    with pytest.raises(DatasetError, match="sequence dataset"):
        train_score(
            tiny_score_config(
                data,
                ae,
                tmp_path / "score",
                kind="conv",
                widths=(16, 16),
                attention_heads=0,
                memory=True,
            ),
            CPU,
        )


def test_outage_evaluation_compares_memory_with_memoryless(tmp_path: Path, trained) -> None:
    data, score = trained
    out = tmp_path / "eval"
    code = eval_main(
        [
            "--data",
            str(data),
            "--model",
            str(score),
            "--reference",
            str(score),
            "--outages",
            "1,2.5,60",
            "--window",
            "2",
            "--starts-per-scene",
            "2",
            "--fid-samples",
            "0",
            "--samplers",
            "dpmpp_2m_sde:8",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [o["seconds"] for o in summary["outages"]] == [1.0, 2.5], "60 s fits no scene"
    one = summary["outages"][0]
    assert one["cases"] == 2 * 2 * 6, "2 scenes x 2 starts x (3 single + 3 pairs)"
    methods = one["methods"]
    assert set(methods) == {
        "reconstructed",
        "hold last",
        "memory",
        "same model, no memory",
        "reference (memoryless)",
        "memory, new noise every frame",
    }
    assert methods["reconstructed"]["psnr"] > methods["same model, no memory"]["psnr"]
    assert methods["hold last"]["flicker"] == pytest.approx(0.0), "a held frame never moves"
    assert all(m["coherence"] is not None for m in methods.values()), "labels: coherence"
    assert (out / "strip_1s.png").is_file() and "| 1 s | memory |" in (
        out / "summary.md"
    ).read_text()


def test_outages_need_a_video_aware_model(tmp_path: Path, trained) -> None:
    data, _ = trained
    code = eval_main(
        ["--data", str(data), "--outages", "1", "--fid-samples", "0", "--out", str(tmp_path / "e")]
    )
    assert code == 2, "--outages without --model is a usage error"


@pytest.mark.parametrize("imputer", ["diffusion", "ridge"])
def test_the_receiver_imputes_a_failed_camera_from_its_memory(
    request: pytest.FixtureRequest, imputer: str
) -> None:
    """Real ZeroMQ: frame set 0 is seen whole, in frame set 1 cam1 disconnects; the receiver imputes
    it with cam1's memory (its latent of frame set 0, 0.5 s old), not from the others alone:
    the diffusion imputer of a video-aware network, and the ridge imputer through the memory
    prior of a video-aware prior network."""
    import time

    import numpy as np
    from receiver_fixtures import connected_publisher, wait_until

    from mvld.common.dataset import FrameSetFolder
    from mvld.common.preprocess import preprocess_images
    from mvld.common.wire import FrameSetMessage, ViewRecord, encode_frameset
    from mvld.receiver.service import ReceiverConfig, ReceiverService
    from mvld.receiver.stage import node_seed

    data, score = request.getfixturevalue("trained")
    if imputer == "ridge":
        score = request.getfixturevalue("trained_with_prior")
    model = load_mvld_model(score)
    folder = FrameSetFolder(data)
    images = np.stack([np.stack(folder[i].views) for i in (10, 11)])  # [2, V, H, W, 3]
    with torch.inference_mode():
        z = model.autoencoder.encoder(
            torch.from_numpy(
                preprocess_images(
                    list(images.reshape(-1, *images.shape[2:])), model.preprocess, "RGB"
                )
            )
        )
    z = z.numpy().reshape(2, 3, *model.autoencoder.config.latent_shape)  # as the edge sends it
    t0 = time.time()

    def message(seq: int, failed: tuple[int, ...]) -> bytes:
        views = tuple(
            ViewRecord(f"cam{v}", "failed", "disconnected", None, None)
            if v in failed
            else ViewRecord(f"cam{v}", "ok", "none", t0 + 0.5 * seq, z[seq, v])
            for v in range(3)
        )
        return encode_frameset(
            FrameSetMessage("node-a", seq, t0 + 0.5 * seq, model.fingerprint, views)
        )

    collected: list = []
    config = ReceiverConfig(
        bind=("tcp://127.0.0.1:0",),
        gpu=-1,
        model=str(score),
        steps=8,
        max_age_ms=60_000.0,
        imputer=imputer,
    )
    with (
        ReceiverService(config, extra_hooks=[("collect", collected.append)]) as service,
        connected_publisher(service.endpoints[0]) as publisher,
    ):
        publisher.send(message(0, ()))
        wait_until(lambda: len(collected) >= 1, 30, "the whole frame set")
        publisher.send(message(1, (1,)))
        wait_until(lambda: len(collected) >= 2, 30, "the frame set with cam1 failed")
    seen, result = collected
    assert service.metrics.drops() == {}, "nothing refused"
    remembered = torch.from_numpy(np.stack([v.latent for v in seen.views]))[None]
    sent = torch.from_numpy(np.stack([v.latent for v in result.views]))[None]
    present = torch.tensor([[True, False, True]])
    seed = [node_seed("node-a")]
    with_memory = service.imputer(
        sent, present, seed=seed, memory=remembered, memory_age=torch.tensor([[0.5, 0.5, 0.5]])
    ).latents[0, 1]
    without = service.imputer(sent, present, seed=seed).latents[0, 1]
    delivered = torch.from_numpy(result.view("cam1").latent)
    # Thread counts and batch shapes change float rounding, which the sampler amplifies a
    # little: the delivered view must be far nearer the memory imputation than the other.
    near, far = (delivered - with_memory).abs().max(), (delivered - without).abs().max()
    assert near < 0.1 * far, f"imputed with cam1's memory: {near:.2e} vs {far:.2e}"
    assert service.stage.memory.restarts == 0 and len(service.stage.memory) == 1


def test_a_video_aware_prior_network_fits_its_memory_prior_and_is_scored_with_it(
    tmp_path: Path, trained, trained_with_prior
) -> None:
    """--memory --prior: the memory prior is fitted on the scenes before training and kept in
    the checkpoint; the outage evaluation adds the deterministic imputer with and without it."""
    data, _ = trained
    model = load_mvld_model(trained_with_prior)
    assert model.score_net.memory_prior is not None and model.score_net.memory_prior.fitted
    out = tmp_path / "eval"
    args = ["--data", str(data), "--model", str(trained_with_prior)]
    args += ["--reference", str(trained_with_prior), "--outages", "1", "--window", "2"]
    args += ["--starts-per-scene", "1", "--fid-samples", "0", "--samplers", "dpmpp_2m_sde:8"]
    assert eval_main([*args, "--out", str(out)]) == 0
    methods = json.loads((out / "summary.json").read_text())["outages"][0]["methods"]
    assert {"ridge + memory prior", "ridge (memoryless)"} <= set(methods)
    assert methods["ridge + memory prior"]["psnr"] != methods["ridge (memoryless)"]["psnr"]


def test_mvld_train_memory_makes_a_prior_network_video_aware(tmp_path: Path, trained) -> None:
    """`mvld-train memory`: the memory prior is fitted onto a trained prior network; without
    memories the new model imputes exactly as the old one, with them it differs."""
    from mvld.receiver.imputation import Imputer
    from mvld.train.cli import main as train_main

    data, _ = trained
    ae = train_autoencoder(
        tiny_ae_config(data, tmp_path / "ae", latent_channels=2, latent_dim=32, steps=2), CPU
    )
    plain = train_score(
        tiny_score_config(
            data, ae, tmp_path / "plain", kind="conv", widths=(16, 16), prior=True, steps=4
        ),
        CPU,
    )
    out = tmp_path / "memory"
    args = ["memory", "--data", str(data), "--model", str(plain), "--out", str(out)]
    assert train_main([*args, "--max-age-s", "5", "--no-progress"]) == 0
    aware = load_mvld_model(out / "last")
    assert aware.score_net.config.memory and aware.score_net.memory_prior.fitted
    assert "memory_prior" in json.loads((out / "last.json").read_text())["training"]
    old = load_mvld_model(plain)
    dim = old.score_net.config.latent_dim
    latents = torch.randn(4, 3, dim)
    present = torch.tensor([[True, False, True]] * 4)
    before = Imputer.from_model(old, sampler="dpmpp_2m_sde", steps=8)(latents, present, seed=1)
    after = Imputer.from_model(aware, sampler="dpmpp_2m_sde", steps=8)
    assert torch.allclose(after(latents, present, seed=1).latents, before.latents, atol=1e-5)
    memory, age = torch.randn(4, 3, dim), torch.full((4, 3), 0.5)
    remembered = after(latents, present, seed=1, memory=memory, memory_age=age).latents
    assert not torch.allclose(remembered, before.latents, atol=1e-3)


def test_mvld_train_memory_refuses_a_network_without_prior(tmp_path: Path, trained) -> None:
    from mvld.train.cli import main as train_main

    data, score = trained  # a memory network without a regression prior
    args = ["memory", "--data", str(data), "--model", str(score), "--out", str(tmp_path / "m")]
    assert train_main(args) == 2
