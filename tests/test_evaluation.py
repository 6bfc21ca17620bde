"""mvld-eval end to end on a tiny rig and tiny model; metrics and trade-off helpers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import write_tiny_rig

from mvld.common.errors import ConfigError, DatasetError
from mvld.common.preprocess import PreprocessConfig, preprocess_images
from mvld.model.autoencoder import Autoencoder, AutoencoderConfig
from mvld.model.checkpoint import LatentStats, MVLDModel, save_mvld_model
from mvld.model.classifier import (
    ClassifierConfig,
    ViewClassifier,
    accuracy,
    load_classifier,
    save_classifier,
)
from mvld.model.score_net import ScoreNet, ScoreNetConfig
from mvld.model.sde import VPSDE
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
from mvld.train.tradeoff import CODEC_SWEEPS, code_frames, curve_above, over_the_wire, sent_patterns

SIZE, DIM, CLASSES = 32, 8, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny rig, a random complete model and a random classifier, saved as files."""
    root = tmp_path_factory.mktemp("eval")
    data = write_tiny_rig(root / "rig", count=80, size=SIZE)
    torch.manual_seed(0)
    preprocess = PreprocessConfig(height=SIZE, width=SIZE)
    score_net = ScoreNet(ScoreNetConfig(num_views=3, latent_dim=DIM, widths=(16, 8), time_dim=8))
    torch.nn.init.normal_(score_net.output.weight, std=0.1)
    model = MVLDModel(
        preprocess=preprocess,
        autoencoder=Autoencoder(
            AutoencoderConfig(image_size=SIZE, latent_dim=DIM, channels=(4, 8))
        ),
        score_net=score_net,
        sde=VPSDE(),
        latent_stats=LatentStats(torch.zeros(3, DIM), torch.ones(3, DIM)),
        fingerprint="",
    )
    save_mvld_model(root / "model", model)
    classifier = ViewClassifier(
        ClassifierConfig(num_classes=CLASSES, image_size=SIZE, channels=(4, 8))
    )
    save_classifier(root / "classifier", classifier.eval(), preprocess)
    return {"data": data, "model": root / "model", "classifier": root / "classifier", "root": root}


@pytest.fixture(scope="module")
def evaluation(assets: dict[str, Path]):
    config = EvalConfig(
        data=str(assets["data"]),
        out=str(assets["root"] / "out"),
        model=str(assets["model"]),
        classifier=str(assets["classifier"]),
        samplers=parse_samplers("dpmpp_2m:8,euler_maruyama:8,dpmpp_2m:8:mean3"),
        fid_samples=0,
        frames=8,
        grid_rows=2,
        grid_samples=2,
        throughput_batch=8,
    )
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
    assert [s.label for s in parse_samplers("heun:10, dpmpp_2m:20")] == ["heun:10", "dpmpp_2m:20"]
    with pytest.raises(ConfigError, match=r"valid: .*dpmpp_2m"):
        parse_samplers("ddim:10")
    means = parse_samplers("heun:10,dpmpp_2m_sde:20:mean8")
    assert [(s.label, s.mean_of) for s in means] == [("heun:10", 1), ("dpmpp_2m_sde:20:mean8", 8)]
    bad_specs = ("heun", "heun:1", "heun:x", "", "heun:5,heun:5", "heun:10,heun:10:mean1")
    for bad in (*bad_specs, "heun:10,heun:10:avg8", "heun:10:mean4"):
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


def test_wire_bytes_grow_with_views_and_precision_and_int8_stays_within_half_a_step():
    rng = np.random.default_rng(0)
    latents = rng.normal(0, 3, (4, 3, 2 * 4 * 4)).astype(np.float32)
    sizes, received = {}, {}
    for k in (1, 2, 3):
        for dtype in ("int8", "float16", "float32"):
            sent = np.arange(3) < k
            received[k, dtype], nbytes = over_the_wire(latents, sent, (2, 4, 4), dtype, "ab" * 32)
            sizes[k, dtype] = int(nbytes[0])
            assert (nbytes == nbytes[0]).all() and (received[k, dtype][:, ~sent] == 0).all()
    for dtype in ("int8", "float16", "float32"):
        assert sizes[1, dtype] < sizes[2, dtype] < sizes[3, dtype]
    for k in (1, 2, 3):
        assert sizes[k, "int8"] < sizes[k, "float16"] < sizes[k, "float32"]
    np.testing.assert_array_equal(received[3, "float32"], latents)
    step = np.abs(latents).max(axis=2, keepdims=True) / 127
    assert (np.abs(received[3, "int8"] - latents) <= step / 2 + 1e-6).all()
    assert sent_patterns(3, 2) == [(True, True, False), (True, False, True), (False, True, True)]
    with pytest.raises(ConfigError):
        sent_patterns(3, 4)


@pytest.mark.parametrize("name", list(CODEC_SWEEPS))
def test_codec_bytes_grow_with_quality_and_decode_to_the_same_shape(name):
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (2, 3, 32, 32, 3), dtype=np.uint8)
    (low, low_bytes), (high, high_bytes) = (
        code_frames(frames, CODEC_SWEEPS[name], q) for q in (5, 95)
    )
    assert low_bytes < high_bytes and high.shape == frames.shape
    assert (
        psnr(high.reshape(-1, 32, 32, 3), frames.reshape(-1, 32, 32, 3)).mean()
        > psnr(low.reshape(-1, 32, 32, 3), frames.reshape(-1, 32, 32, 3)).mean()
    )


def test_tiling_costs_fewer_bytes_than_one_file_per_view():
    frames = np.zeros((2, 3, 32, 32, 3), np.uint8)
    frames[..., 0] = 120  # flat views: headers dominate
    _, per_view = code_frames(frames, CODEC_SWEEPS["webp"], 50)
    _, tiled = code_frames(frames, CODEC_SWEEPS["webp_tiled"], 50)
    assert tiled < per_view


def test_curve_above_counts_wins_and_names_losses():
    rows = [
        {"views_sent": 1, "dtype": "int8", "psnr": 25.0, **{name: None for name in CODEC_SWEEPS}},
        {
            "views_sent": 2,
            "dtype": "int8",
            "psnr": 26.0,
            **{name: {"psnr": 27.0} for name in CODEC_SWEEPS},
        },
    ]
    verdict = curve_above(rows, "psnr")
    assert verdict["wins"] == 0 and verdict["comparisons"] == len(CODEC_SWEEPS)
    assert {x["codec"] for x in verdict["losses"]} == set(CODEC_SWEEPS)
    assert curve_above(rows, "psnr", higher_is_better=False)["wins"] == len(CODEC_SWEEPS)


def test_summary_has_every_method_and_pattern(evaluation):
    config, _, path = evaluation
    summary = json.loads(path.read_text())
    assert summary["schema"] == "mvld-eval/1"
    methods = [
        "real views",
        "reconstructed",
        "dpmpp_2m:8",
        "euler_maruyama:8",
        "dpmpp_2m:8:mean3",
        "mean_latent",
        "nearest_neighbour",
        "ridge_regressor",
    ]
    groups = summary["patterns"] + [
        "1 missing (pooled)",
        "2 missing (pooled)",
        "all patterns (pooled)",
    ]
    present = {(r["method"], r["group"]) for r in summary["rows"]}
    assert present == {(m, g) for m in methods for g in groups}
    cost = {m["label"]: m for m in summary["methods"]}
    assert cost["dpmpp_2m:8"]["nfe"] == 8 and cost["euler_maruyama:8"]["nfe"] == 8
    assert cost["dpmpp_2m:8:mean3"]["nfe"] == 24  # three samples of 8 evaluations each
    assert cost["mean_latent"]["nfe"] == 0
    assert all(r["fid"] is None for r in summary["rows"])  # --fid-samples 0
    names = {t["name"] for t in summary["targets"]}
    assert {
        "fast_coherence_vs_reference",
        "single_missing_coherence_ratio",
        "cpu_throughput",
        "beats_mean_latent_coherence_1_missing",
        "beats_ridge_regressor_psnr_2_missing",
        "fast_psnr_vs_reference",
    } <= names
    assert summary["throughput"]["batch"] == 8
    out = Path(config.out)
    assert (out / "summary.md").read_text().count("dpmpp_2m:8") >= 7
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
    row = next(
        r
        for r in result.summary["rows"]
        if r["method"] == "real views" and r["group"] == "cam1 missing"
    )
    assert row["coherence"] == pytest.approx(expected)
    assert row["views"] == len(held_out)


def test_full_trade_off_point_is_reconstruction(evaluation):
    _, result, _ = evaluation
    tradeoff = result.summary["tradeoff"]
    recon = [
        r
        for r in result.summary["rows"]
        if r["method"] == "reconstructed" and r["group"] in result.summary["patterns"][:3]
    ]  # single views, all cameras
    full = next(p for p in tradeoff["latent"] if p["dtype"] == "float32" and p["views_sent"] == 3)
    assert full["psnr"] == pytest.approx(np.mean([r["psnr"] for r in recon]))
    for dtype in ("int8", "float16", "float32"):
        sizes = [p["bytes"] for p in tradeoff["latent"] if p["dtype"] == dtype]
        assert sizes == sorted(sizes) and len(sizes) == 3
    assert set(tradeoff["codecs"]) == set(CODEC_SWEEPS)
    assert len(tradeoff["matched"]) == 9
    assert {c["metric"] for c in tradeoff["curve_above"]} == {"psnr", "ssim", "fid"}


def test_cli_reports_missing_inputs_clearly(assets, tmp_path, capsys):
    code = main(
        [
            "--data",
            str(tmp_path / "nope"),
            "--model",
            str(assets["model"]),
            "--classifier",
            str(assets["classifier"]),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "nope: dataset folder does not exist" in capsys.readouterr().err
    code = main(
        [
            "--data",
            str(assets["data"]),
            "--model",
            str(tmp_path / "missing"),
            "--classifier",
            str(assets["classifier"]),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "missing.json does not exist" in capsys.readouterr().err
    code = main(
        [
            "--data",
            str(assets["data"]),
            "--model",
            str(assets["model"]),
            "--classifier",
            str(assets["classifier"]),
            "--samplers",
            "nope:3",
        ]
    )
    assert code == 2 and "unknown sampler 'nope'" in capsys.readouterr().err


def test_cli_runs_and_writes_its_results_section(assets, tmp_path, capsys):
    out, results = tmp_path / "docs" / "eval", tmp_path / "docs" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text(
        "# Results\n\n## Model\nkept\n\n## Imputation (`mvld-eval`)\nold\n\n## Later\nalso kept\n"
    )
    argv = [
        "--data",
        str(assets["data"]),
        "--model",
        str(assets["model"]),
        "--classifier",
        str(assets["classifier"]),
        "--out",
        str(out),
        "--frames",
        "3",
        "--fid-samples",
        "0",
        "--samplers",
        "heun:10",
        "--results",
        str(results),
    ]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0 and captured.out.strip() == str(out / "summary.json")
    assert "heun:10" in captured.err  # progress on stderr
    assert json.loads((out / "summary.json").read_text())["data"]["evaluated"] == 3
    text = results.read_text()
    assert "kept" in text and "also kept" in text and "\nold\n" not in text
    assert text.count("## Imputation (`mvld-eval`)") == 1 and "mvld-eval --data" in text
    assert "](eval/tradeoff.png)" in text
    assert main(argv) == 0 and results.read_text().count("## Imputation (`mvld-eval`)") == 1


def test_fit_data_fits_the_baselines_elsewhere_and_holds_out_all_of_data(assets, tmp_path):
    """--fit-data: baselines on (up to fit_frames of) another dataset; every frame set of
    --data may be evaluated, none of it is used for fitting."""
    from mvld.train.evaluation import load_inputs

    other = write_tiny_rig(tmp_path / "other", count=30, size=SIZE)
    config = EvalConfig(
        data=str(assets["data"]),
        out=str(tmp_path / "out"),
        model=str(assets["model"]),
        classifier=str(assets["classifier"]),
        fit_data=str(other),
        fit_frames=12,
        frames=80,
        fid_samples=0,
    )
    inputs = load_inputs(config)
    complete = int(load_frame_arrays(other, SIZE, SIZE, limit=12).present.all(1).sum())
    assert 2 <= complete <= 12 and inputs.train_z.shape == (complete, 3, DIM)
    assert inputs.split["train_complete"] == complete and inputs.split["fit_data"] == str(other)
    assert inputs.split["held_out"] == 80  # all of --data, not its tail
    with pytest.raises(DatasetError, match="does not exist"):
        load_inputs(EvalConfig(**{**config.__dict__, "fit_data": str(tmp_path / "missing")}))
