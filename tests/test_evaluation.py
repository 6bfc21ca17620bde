"""mvld-eval end to end on a tiny rig and tiny model; metrics and trade-off helpers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import write_tiny_rig

from mvld.common.autoencoder import Autoencoder, AutoencoderConfig
from mvld.common.checkpoint import LatentStats, MVLDModel, save_mvld_model
from mvld.common.errors import ConfigError
from mvld.common.preprocess import PreprocessConfig, preprocess_images
from mvld.common.score_net import ScoreNet, ScoreNetConfig
from mvld.common.sde import VPSDE
from mvld.train.classifier import (
    ClassifierConfig,
    ViewClassifier,
    accuracy,
    load_classifier,
    save_classifier,
)
from mvld.train.eval_cli import main
from mvld.train.eval_report import write_outputs
from mvld.train.evaluation import (
    EvalConfig,
    evaluate,
    missing_index,
    missing_patterns,
    parse_samplers,
)
from mvld.train.frames import evenly_spaced, load_frame_arrays, split_train_val
from mvld.train.image_quality import PSNR_CAP_DB, psnr, ssim
from mvld.train.tradeoff import code_frames, latent_tradeoff, wire_bytes

SIZE, DIM, CLASSES = 32, 8, 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids contention on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny rig, a random complete model and a random classifier, saved as files."""
    root = tmp_path_factory.mktemp("eval")
    data = write_tiny_rig(root / "rig", count=80, size=SIZE)
    torch.manual_seed(0)
    preprocess = PreprocessConfig(height=SIZE, width=SIZE)
    score_net = ScoreNet(ScoreNetConfig(num_views=3, latent_dim=DIM, widths=(16, 8),
                                        time_dim=8))
    torch.nn.init.normal_(score_net.output.weight, std=0.1)
    model = MVLDModel(preprocess=preprocess,
                      autoencoder=Autoencoder(AutoencoderConfig(image_size=SIZE, latent_dim=DIM,
                                                                channels=(4, 8))),
                      score_net=score_net, sde=VPSDE(),
                      latent_stats=LatentStats(torch.zeros(3, DIM), torch.ones(3, DIM)),
                      fingerprint="")
    save_mvld_model(root / "model", model)
    classifier = ViewClassifier(ClassifierConfig(num_classes=CLASSES, image_size=SIZE,
                                                 channels=(4, 8)))
    save_classifier(root / "classifier", classifier.eval(), preprocess)
    return {"data": data, "model": root / "model", "classifier": root / "classifier",
            "root": root}


@pytest.fixture(scope="module")
def evaluation(assets: dict[str, Path]):
    config = EvalConfig(data=str(assets["data"]), out=str(assets["root"] / "out"),
                        model=str(assets["model"]), classifier=str(assets["classifier"]),
                        samplers=parse_samplers("dpmpp_2m:4,euler_maruyama:8"), fid_samples=0,
                        frames=8, grid_rows=2, grid_samples=2, throughput_batch=8)
    result = evaluate(config)
    return config, result, write_outputs(result, config.out)


def test_patterns_cover_every_proper_non_empty_subset():
    patterns = missing_patterns(3)
    assert len(patterns) == 6 and len(set(patterns)) == 6
    assert all(any(p) and not all(p) for p in patterns)
    assert [sum(not v for v in p) for p in patterns] == [1, 1, 1, 2, 2, 2]
    assert missing_patterns(2) == [(False, True), (True, False)]
    assert missing_index((True, False, False), 2).tolist() == [1, 2, 4, 5]


def test_sampler_specs_are_validated():
    assert [s.label for s in parse_samplers("heun:10, dpmpp_2m:20")] == ["heun:10",
                                                                         "dpmpp_2m:20"]
    with pytest.raises(ConfigError, match=r"valid: .*dpmpp_2m"):
        parse_samplers("ddim:10")
    for bad in ("heun", "heun:1", "heun:x", "", "heun:5,heun:5"):
        with pytest.raises(ConfigError):
            parse_samplers(bad)


def test_psnr_and_ssim_known_values():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert psnr(image, image).tolist() == [PSNR_CAP_DB] * 2
    np.testing.assert_allclose(ssim(image, image), 1.0)
    off_by_ten = np.clip(image.astype(int) + 10, 0, 255).astype(np.uint8)
    plus_ten = np.full((1, 16, 16, 3), 110, np.uint8)
    assert psnr(plus_ten, plus_ten - 10)[0] == pytest.approx(20 * np.log10(255 / 10))
    noisy = np.clip(image + rng.normal(0, 40, image.shape), 0, 255).astype(np.uint8)
    assert (ssim(noisy, image) < ssim(off_by_ten, image)).all()
    assert (psnr(noisy, image) < psnr(off_by_ten, image)).all()


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 140 + c1) / (100**2 + 140**2 + c1)
    assert ssim(a, b)[0] == pytest.approx(expected, rel=1e-5)


def test_wire_bytes_grow_with_views_and_precision():
    sizes = {(k, d): wire_bytes(3, k, 64, d) for k in (1, 2, 3) for d in ("float16", "float32")}
    assert sizes[(1, "float16")] < sizes[(2, "float16")] < sizes[(3, "float16")]
    for k in (1, 2, 3):
        extra = sizes[(k, "float32")] - sizes[(k, "float16")]
        assert 128 * k <= extra <= 128 * k + 2 * k  # the payload plus bin-length headers
    with pytest.raises(ConfigError):
        wire_bytes(3, 4, 64, "float16")


def test_codec_bytes_grow_with_quality_and_decode_to_the_same_shape():
    frames = np.random.default_rng(2).integers(0, 256, (2, 3, 32, 32, 3), dtype=np.uint8)
    low, high = code_frames(frames, "jpeg", 5), code_frames(frames, "jpeg", 95)
    assert low.bytes_per_frame_set < high.bytes_per_frame_set
    assert high.decoded.shape == frames.shape
    assert psnr(high.decoded.reshape(-1, 32, 32, 3), frames.reshape(-1, 32, 32, 3)).mean() > \
        psnr(low.decoded.reshape(-1, 32, 32, 3), frames.reshape(-1, 32, 32, 3)).mean()
    with pytest.raises(ConfigError, match="valid: jpeg, webp"):
        code_frames(frames, "gif", 10)


def test_latent_tradeoff_mixes_sent_and_imputed_views():
    recon_correct, recon_psnr = np.ones((2, 3)), np.full((2, 3), 30.0)
    per_pattern = {(True, False, False): (np.zeros((2, 2)), np.full((2, 2), 15.0)),
                   (True, True, False): (np.zeros((2, 1)), np.full((2, 1), 15.0))}
    points = latent_tradeoff(per_pattern, recon_correct, recon_psnr, latent_dim=8)
    assert [p["views_sent"] for p in points] == [1, 2, 3]
    assert [p["coherence"] for p in points] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [p["psnr"] for p in points] == pytest.approx([20.0, 25.0, 30.0])
    assert points[0]["payload_bytes_float16"] == 16


def test_summary_has_every_method_and_pattern(evaluation):
    config, _, path = evaluation
    summary = json.loads(path.read_text())
    assert summary["schema"] == "mvld-eval/1"
    methods = ["real views", "reconstructed", "dpmpp_2m:4", "euler_maruyama:8", "mean_latent",
               "nearest_neighbour", "ridge_regressor"]
    groups = summary["patterns"] + ["1 missing (pooled)", "2 missing (pooled)",
                                    "all patterns (pooled)"]
    present = {(r["method"], r["group"]) for r in summary["rows"]}
    assert present == {(m, g) for m in methods for g in groups}
    cost = {m["label"]: m for m in summary["methods"]}
    assert cost["dpmpp_2m:4"]["nfe"] == 4 and cost["euler_maruyama:8"]["nfe"] == 8
    assert cost["mean_latent"]["nfe"] == 0
    assert all(r["fid"] is None for r in summary["rows"])  # --fid-samples 0
    names = {t["name"] for t in summary["targets"]}
    assert {"fast_coherence_vs_reference", "single_missing_coherence_ratio",
            "cpu_throughput", "beats_mean_latent_coherence"} <= names
    assert summary["throughput"]["batch"] == 8
    out = Path(config.out)
    assert (out / "summary.md").read_text().count("dpmpp_2m:4") >= 7
    for name in summary["files"]["grids"] + summary["files"]["plots"]:
        assert (out / name).stat().st_size > 100


def test_evenly_spaced_keeps_both_ends_and_spreads_the_rest() -> None:
    tail = np.arange(100, 200)
    picked = evenly_spaced(tail, 5)
    assert picked.tolist() == [100, 125, 150, 174, 199]  # first, last, gaps of ~24.75
    assert evenly_spaced(tail, 100) is tail and evenly_spaced(tail, 500) is tail
    assert evenly_spaced(tail, 1).tolist() == [100]


def test_real_view_coherence_is_the_classifier_accuracy_on_those_views(assets, evaluation):
    _, result, _ = evaluation
    arrays = load_frame_arrays(assets["data"], SIZE, SIZE)
    _, held_out = split_train_val(len(arrays.stems), 0.1)
    held_out = held_out[arrays.present[held_out].all(1)]
    assert result.summary["data"]["evaluated"] == len(held_out) == 7
    classifier, preprocess = load_classifier(assets["classifier"])
    images = torch.from_numpy(preprocess_images(arrays.images[held_out, 1], preprocess))
    expected = accuracy(classifier, images, torch.from_numpy(arrays.labels[held_out]))
    row = next(r for r in result.summary["rows"]
               if r["method"] == "real views" and r["group"] == "cam1 missing")
    assert row["coherence"] == pytest.approx(expected)
    assert row["views"] == len(held_out)


def test_full_trade_off_point_is_reconstruction(evaluation):
    _, result, _ = evaluation
    tradeoff = result.summary["tradeoff"]
    recon = [r for r in result.summary["rows"] if r["method"] == "reconstructed"
             and r["group"] in result.summary["patterns"][:3]]  # single views, all cameras
    assert tradeoff["latent"][-1]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in recon]))
    sizes = [p["bytes_float16"] for p in tradeoff["latent"]]
    assert sizes == sorted(sizes) and len(sizes) == 3
    assert set(tradeoff["codecs"]) == {"jpeg", "webp"}


def test_cli_reports_missing_inputs_clearly(assets, tmp_path, capsys):
    code = main(["--data", str(tmp_path / "nope"), "--model", str(assets["model"]),
                 "--classifier", str(assets["classifier"]), "--out", str(tmp_path / "o")])
    assert code == 2 and "nope: dataset folder does not exist" in capsys.readouterr().err
    code = main(["--data", str(assets["data"]), "--model", str(tmp_path / "missing"),
                 "--classifier", str(assets["classifier"]), "--out", str(tmp_path / "o")])
    assert code == 2 and "missing.json does not exist" in capsys.readouterr().err
    code = main(["--data", str(assets["data"]), "--model", str(assets["model"]),
                 "--classifier", str(assets["classifier"]), "--samplers", "nope:3"])
    assert code == 2 and "unknown sampler 'nope'" in capsys.readouterr().err


def test_cli_runs_and_writes_its_results_section(assets, tmp_path, capsys):
    out, results = tmp_path / "docs" / "eval", tmp_path / "docs" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text("# Results\n\n## Model\nkept\n\n## Imputation (issue 5)\nold\n\n"
                       "## Later\nalso kept\n")
    argv = ["--data", str(assets["data"]), "--model", str(assets["model"]), "--classifier",
            str(assets["classifier"]), "--out", str(out), "--frames", "3", "--fid-samples", "0",
            "--samplers", "heun:3", "--results", str(results)]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0 and captured.out.strip() == str(out / "summary.json")
    assert "heun:3" in captured.err  # progress on stderr
    assert json.loads((out / "summary.json").read_text())["data"]["evaluated"] == 3
    text = results.read_text()
    assert "kept" in text and "also kept" in text and "\nold\n" not in text
    assert text.count("## Imputation (issue 5)") == 1 and "mvld-eval --data" in text
    assert "](eval/tradeoff.png)" in text
    assert main(argv) == 0 and results.read_text().count("## Imputation (issue 5)") == 1
