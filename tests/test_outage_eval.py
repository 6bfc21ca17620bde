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
    score = train_score(
        tiny_score_config(
            data,
            ae,
            root / "score",
            kind="conv",
            widths=(16, 16),
            attention_heads=0,
            memory=True,
            memory_max_age_s=5.0,
        ),
        CPU,
    )
    return data, score


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


def test_the_receiver_imputes_a_failed_camera_from_its_memory(trained) -> None:
    """Real ZeroMQ: frame set 0 is seen whole, in frame set 1 cam1 fails; the receiver imputes
    it with cam1's memory (its latent of frame set 0, 0.5 s old), not from the others alone."""
    import time

    import numpy as np
    from receiver_fixtures import connected_publisher, wait_until

    from mvld.common.dataset import FrameSetFolder
    from mvld.common.preprocess import preprocess_images
    from mvld.common.wire import FrameSetMessage, ViewRecord, encode_frameset
    from mvld.receiver.service import ReceiverConfig, ReceiverService
    from mvld.receiver.stage import node_seed

    data, score = trained
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
            ViewRecord(f"cam{v}", "failed", "black", t0 + 0.5 * seq, None)
            if v in failed
            else ViewRecord(f"cam{v}", "ok", "none", t0 + 0.5 * seq, z[seq, v])
            for v in range(3)
        )
        return encode_frameset(
            FrameSetMessage("node-a", seq, t0 + 0.5 * seq, model.fingerprint, views)
        )

    collected: list = []
    config = ReceiverConfig(
        bind=("tcp://127.0.0.1:0",), gpu=-1, model=str(score), steps=8, max_age_ms=60_000.0
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
