"""`mvld-train all` on a tiny rig: it completes, resumes after SIGINT, writes a verdict."""

import functools
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import write_tiny_rig

from mvld.common.errors import ConfigError
from mvld.model.checkpoint import load_mvld_model, save_mvld_model
from mvld.train.config import TrainAllConfig, parse_budget, stage_tables
from mvld.train.distributed import DistributedContext
from mvld.train.pipeline import (
    MIN_STEPS,
    STAGES,
    TRAINING_SHARE,
    completed,
    evaluate_run,
    mark_complete,
    plan_steps,
    run_pipeline,
)

TINY_TOML = """
[ae]
image_size = 32
latent_dim = 16
channels = [8, 16]
latent_channels = 0
res_blocks = 0
batch_size = 16
steps = 40
lr_schedule = "constant"

[score]
widths = [32, 16]
time_dim = 16
batch_size = 16
steps = 200
lr = 2e-3
lr_schedule = "constant"

[classifier]
channels = [8, 16]
convs_per_stage = 1
batch_size = 16
steps = 20
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _command(data: Path, run: Path, toml: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mvld.train.cli",
        "all",
        "--data",
        str(data),
        "--out",
        str(run),
        "--config",
        str(toml),
        "--eval-frames",
        "8",
        "--exporter",
        "torchscript",
        "--no-progress",
        "--threads",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run stopped by SIGINT inside the score stage, then continued with ``--resume``."""
    root = tmp_path_factory.mktemp("all")
    data = write_tiny_rig(root / "rig")
    toml = root / "tiny.toml"
    toml.write_text(TINY_TOML)
    run = root / "run"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        _command(data, run, toml),
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen = []
    for line in first.stderr:
        seen.append(line)
        if "score step 100/200" in line:
            first.send_signal(signal.SIGINT)
            break
    _, err = first.communicate(timeout=120)
    state = {
        "first_rc": first.returncode,
        "first_err": "".join(seen) + err,
        "markers_after_stop": {s: completed(run, s) is not None for s in STAGES},
    }
    second = subprocess.run(
        _command(data, run, toml, "--resume"), capture_output=True, text=True, env=env, timeout=300
    )
    return state | {"second": second, "run": run, "data": data, "toml": toml}


@pytest.mark.slow
def test_sigint_stops_inside_a_stage_and_resume_skips_the_completed_ones(interrupted_run) -> None:
    assert interrupted_run["first_rc"] == 130, interrupted_run["first_err"][-2000:]
    markers = interrupted_run["markers_after_stop"]
    assert markers["ae"] and markers["latents"], markers
    assert not any(markers[s] for s in ("score", "classifier", "export", "eval")), markers
    second = interrupted_run["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stderr
    for stage in ("ae", "latents"):
        assert f"{stage}: complete" in log and "skipped" in log
    assert "resumed" in log and "at step 100" in log  # the score stage went on from its stop
    run = interrupted_run["run"]
    steps = [
        json.loads(line)["step"]
        for line in (run / "score" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 200  # no step trained twice
    assert all(completed(run, s) for s in STAGES)


@pytest.mark.slow
def test_the_run_writes_a_deployable_model_and_the_verdict(interrupted_run) -> None:
    run, second = interrupted_run["run"], interrupted_run["second"]
    for name in ("encoder.onnx", "decoder.onnx", "score_net.onnx", "model.json"):
        assert (run / "export" / name).stat().st_size > 0
    assert (run / "score" / "ridge.safetensors").stat().st_size > 0  # for --imputer ridge
    verdict = json.loads((run / "verdict.json").read_text())
    assert verdict == json.loads((run / "score" / "verdict.json").read_text())
    assert verdict["coherence_measured"] and verdict["reconstruction"]["psnr"] > 0
    methods = {(r["missing"], r["method"]) for r in verdict["imputation"]}
    assert methods == {
        (m, x)
        for m in (1, 2)
        for x in ("dpmpp_2m_sde:20", "mean_latent", "nearest_neighbour", "ridge_regressor")
    }
    report = (run / "report.md").read_text()
    assert report in second.stdout  # the same table in the terminal
    assert "**Verdict:**" in report and verdict["sentence"] in report
    if not verdict["imputer_wins"]:
        assert verdict["cause"] and verdict["advice"] and "loses to" in verdict["sentence"]


@pytest.mark.slow
def test_a_rerun_of_a_complete_run_trains_nothing(
    interrupted_run, caplog: pytest.LogCaptureFixture
) -> None:
    run = interrupted_run["run"]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    config = TrainAllConfig(data=str(interrupted_run["data"]), out=str(run), progress=False)
    with caplog.at_level(logging.INFO, logger="mvld"):
        result = run_pipeline(
            config,
            DistributedContext(device=torch.device("cpu")),
            stage_tables(str(interrupted_run["toml"])),
        )
    assert caplog.text.count("skipped") == len(STAGES)
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert result.report == (run / "report.md").read_text()
    assert result.model == run / "score" / "best"


@pytest.mark.slow
def test_a_score_network_with_random_weights_is_reported_as_losing(
    interrupted_run, tmp_path: Path
) -> None:
    run = interrupted_run["run"]
    model = load_mvld_model(run / "score" / "best")
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.score_net.parameters():
            parameter.normal_(0.0, 0.5)
    save_mvld_model(tmp_path / "broken", model)
    config = TrainAllConfig(data=str(interrupted_run["data"]), out=str(tmp_path), eval_frames=8)
    verdict = evaluate_run(config, tmp_path / "broken", run / "classifier" / "last")
    assert not verdict["imputer_wins"]
    lost = {(x["missing"], x["baseline"], x["metric"]) for x in verdict["losses"]}
    assert {(m, "ridge_regressor", "psnr") for m in (1, 2)} <= lost
    assert "loses to" in verdict["sentence"]


@pytest.mark.slow
def test_unlabelled_data_gives_a_psnr_only_verdict(interrupted_run, tmp_path: Path) -> None:
    data = write_tiny_rig(tmp_path / "rig")
    (data / "labels.csv").unlink()
    config = TrainAllConfig(data=str(data), out=str(tmp_path), eval_frames=8)
    verdict = evaluate_run(config, interrupted_run["run"] / "score" / "best", None)
    assert not verdict["coherence_measured"]
    assert all(r["coherence"] is None and r["psnr"] is not None for r in verdict["imputation"])


def test_budget_plan_fills_the_training_share_and_keeps_a_floor() -> None:
    seconds = {"ae": 0.1, "score": 0.01, "classifier": 0.05}
    steps = plan_steps(600.0, seconds)
    spent = sum(steps[s] * seconds[s] for s in seconds)
    assert spent == pytest.approx(600.0 * TRAINING_SHARE, rel=0.01)
    assert steps["score"] > steps["ae"]  # a cheaper step gets more of them
    without_labels = plan_steps(600.0, {"ae": 0.1, "score": 0.01})
    assert without_labels["ae"] > steps["ae"]  # the classifier's share goes to the others
    assert plan_steps(1.0, {"ae": 10.0}) == {"ae": MIN_STEPS}


def test_later_stages_absorb_the_time_an_earlier_one_overran(tmp_path: Path) -> None:
    from mvld.train.pipeline import BudgetPlan, resize_for_budget

    seconds = {"ae": 0.1, "score": 0.01, "classifier": 0.05}
    plan = BudgetPlan("600s", plan_steps(600.0, seconds), seconds)
    planned = dict(plan.steps)
    output = tmp_path / "ae" / "best.json"
    output.parent.mkdir()
    output.write_text("{}")
    ae_share = 600.0 * TRAINING_SHARE * 0.4
    mark_complete(tmp_path, "ae", [output], {"seconds": 2 * ae_share})  # took twice its share
    score = resize_for_budget(tmp_path, "score", plan)
    assert score < planned["score"]
    left = 600.0 * TRAINING_SHARE - 2 * ae_share
    assert score == int(left * 0.45 / 0.6 / 0.01)
    assert json.loads((tmp_path / "plan.json").read_text())["steps"]["score"] == score


def test_step_time_is_measured_on_each_stages_real_network() -> None:
    from mvld.train.pipeline import PROBE_STEPS, measure_step_seconds, stage_configs

    tables = {
        "ae": {
            "image_size": 32,
            "channels": [8, 16],
            "latent_channels": 0,
            "latent_dim": 16,
            "batch_size": 4,
        },
        "score": {"widths": [16], "time_dim": 8, "batch_size": 4},
        "classifier": {"channels": [4], "batch_size": 4},
    }
    configs = stage_configs(TrainAllConfig(data="d", out="r"), tables, {"ae": 50})
    assert configs["ae"].steps == 50 and configs["ae"].val_every == 50 // 8
    assert configs["classifier"].image_size == 32  # the autoencoder's size
    for stage in ("ae", "score", "classifier"):
        ticks = itertools.count()  # an injected clock: every reading 1 s later
        seconds = measure_step_seconds(
            stage,
            configs[stage],
            3,
            configs["ae"],
            torch.device("cpu"),
            clock=functools.partial(next, ticks),
        )
        assert seconds == 1.0
        assert next(ticks) == 2 * PROBE_STEPS  # one start and one stop per timed step


def test_budget_durations_parse_and_nonsense_is_refused() -> None:
    assert parse_budget("60m") == 3600.0
    assert parse_budget("1h30m") == 5400.0
    assert parse_budget("90s") == 90.0
    for bad in ("60", "soon", "0m", "5 parsecs"):
        with pytest.raises(ConfigError):
            parse_budget(bad)


def test_a_stage_is_complete_only_with_its_marker_and_every_output(tmp_path: Path) -> None:
    run = tmp_path
    output = run / "ae" / "best.safetensors"
    output.parent.mkdir()
    assert completed(run, "ae") is None
    with pytest.raises(RuntimeError):
        mark_complete(run, "ae", [output])  # the output does not exist yet
    output.write_bytes(b"weights")
    mark_complete(run, "ae", [output], {"steps": 5})
    assert completed(run, "ae")["steps"] == 5
    assert not list((run / "ae").glob("*.tmp"))
    output.unlink()
    assert completed(run, "ae") is None  # an output gone: the stage runs again
    (run / "ae" / "done.json").write_text("{not json")
    assert completed(run, "ae") is None


def test_interrupted_stage_is_not_discarded_without_resume(tmp_path: Path) -> None:
    from mvld.train.pipeline import _resume_flag
    from mvld.train.state import state_path

    path = state_path(tmp_path / "ae" / "last")
    path.parent.mkdir()
    path.write_bytes(b"state")
    with pytest.raises(ConfigError, match="--resume"):
        _resume_flag(TrainAllConfig(data="d", out=str(tmp_path)), "ae")
    assert _resume_flag(TrainAllConfig(data="d", out=str(tmp_path), resume=True), "ae")


@pytest.mark.slow
def test_mvld_eval_runs_on_unlabelled_data_and_says_coherence_is_skipped(
    interrupted_run, tmp_path: Path
) -> None:
    from mvld.train.eval_report import write_outputs
    from mvld.train.evaluation import EvalConfig, evaluate, parse_samplers

    data = write_tiny_rig(tmp_path / "rig", count=40)
    (data / "labels.csv").unlink()
    config = EvalConfig(
        data=str(data),
        out=str(tmp_path / "eval"),
        model=str(interrupted_run["run"] / "score" / "best"),
        samplers=parse_samplers("dpmpp_2m:8"),
        fid_samples=0,
        frames=4,
        grid_rows=1,
        grid_samples=1,
        throughput_batch=4,
    )
    result = evaluate(config)
    summary = json.loads(write_outputs(result, config.out).read_text())
    assert summary["data"]["labelled"] is False and summary["data"]["classifier"] is None
    assert all(r["coherence"] is None and r["fd_classifier"] is None for r in summary["rows"])
    assert all(r["psnr"] is not None for r in summary["rows"] if r["method"] != "real views")
    assert "skipped: no labels" in (tmp_path / "eval" / "summary.md").read_text()


def test_the_receivers_ridge_imputer_is_the_evaluated_ridge_baseline(tmp_path: Path) -> None:
    """What ``--imputer ridge`` serves is exactly the ridge row of the verdict."""
    from mvld.model.checkpoint import LatentStats
    from mvld.receiver.imputation import Provenance
    from mvld.receiver.ridge_imputer import RidgeImputer, load_ridge_weights
    from mvld.train.baselines import RidgeRegressor
    from mvld.train.pipeline import save_receiver_ridge

    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(3 * 4, 3 * 4, generator=generator)
    train_z = (torch.randn(200, 12, generator=generator) @ mixing).reshape(200, 3, 4)
    path = save_receiver_ridge(tmp_path / "ridge.safetensors", train_z, "enc")
    fits, meta = load_ridge_weights(path)
    assert meta["fingerprint"] == "enc" and len(fits) == 7  # every pattern but all-present
    stats = LatentStats(mean=torch.full((3, 4), 2.0), std=torch.full((3, 4), 3.0))
    imputer = RidgeImputer(fits, stats)
    z = torch.randn(6, 3, 4, generator=generator)
    present = torch.tensor(
        [
            [True, False, True],
            [False, False, True],
            [True, True, True],
            [False, True, False],
            [False, False, False],
            [True, True, False],
        ]
    )
    result = imputer(stats.destandardise(z), present)
    expected = RidgeRegressor(train_z)(z, present)
    expected[4] = train_z.double().mean(0).float()  # nothing observed: the training mean
    torch.testing.assert_close(stats.standardise(result.latents), expected, rtol=1e-4, atol=1e-4)
    assert result.provenance[4] == [Provenance.UNCONDITIONED] * 3
    assert result.provenance[0] == [Provenance.OBSERVED, Provenance.IMPUTED, Provenance.OBSERVED]
    assert torch.equal(imputer(stats.destandardise(z), present).latents, result.latents)
    with pytest.raises(ConfigError, match="deterministic"):
        imputer(stats.destandardise(z), present, samples=2)


def test_receiver_logs_the_verdict_beside_the_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mvld.receiver.imputation import log_model_verdict

    with caplog.at_level(logging.INFO, logger="mvld"):
        assert log_model_verdict(tmp_path / "best") is None
    assert "no model verdict" in caplog.text
    caplog.clear()
    (tmp_path / "verdict.json").write_text(
        json.dumps(
            {
                "imputer_wins": False,
                "sentence": "The diffusion imputer loses to ridge_regressor.",
                "best_psnr": {"1": "ridge_regressor"},
            }
        )
    )
    with caplog.at_level(logging.INFO, logger="mvld"):
        assert log_model_verdict(tmp_path / "best")["imputer_wins"] is False
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "loses to ridge_regressor" in warning.getMessage()
    assert "--imputer ridge" in warning.getMessage()


@pytest.mark.slow
def test_the_receiver_serves_the_runs_ridge_imputer_and_logs_its_verdict(
    interrupted_run, caplog: pytest.LogCaptureFixture
) -> None:
    from mvld.receiver.ridge_imputer import RidgeImputer
    from mvld.receiver.service import ReceiverConfig, ReceiverService

    model = str(interrupted_run["run"] / "score" / "best")
    with pytest.raises(ConfigError, match="deterministic"):
        ReceiverConfig(model=model, imputer="ridge", samples=2)
    config = ReceiverConfig(bind=("tcp://127.0.0.1:0",), gpu=-1, model=model, imputer="ridge")
    with caplog.at_level(logging.INFO, logger="mvld"):
        service = ReceiverService(config)
    try:
        assert isinstance(service.imputer, RidgeImputer)
        present = torch.tensor([[True, False, True]])
        latents = torch.randn(1, 3, service.model.autoencoder.config.latent_dim)
        result = service.imputer(latents, present)
        assert torch.equal(result.latents[:, [0, 2]], latents[:, [0, 2]])
        assert result.nfe == 0
    finally:
        service.close()
    verdict = json.loads((interrupted_run["run"] / "verdict.json").read_text())
    assert "model verdict" in caplog.text and verdict["sentence"] in caplog.text
