"""``mvld-train all``: a dataset folder in, a deployable model with an honest verdict out.

Stages, each in its own folder of the run folder ``RUN``:

=============  ==========================================================================
``ae``         the shared autoencoder (:func:`~mvld.train.autoencoder_training.train_autoencoder`)
``latents``    the latent cache of every view, encoded by ``ae/best`` (``score/latents...``)
``score``      the score network on those latents
``classifier`` the label classifier, only when the dataset has labels (coherence needs it)
``export``     ONNX files for the edge (:func:`~mvld.export.onnx_export.export_model`)
``eval``       held-out reconstruction and imputation against the baselines: the verdict,
               and the ridge baseline's weights for the receiver (``--imputer ridge``)
=============  ==========================================================================

A stage is **complete** when its folder holds ``done.json`` naming the stage, and every file
that marker lists exists. The marker is written atomically (temporary file, then rename) after
the stage's outputs, so an interrupt leaves a stage either complete or not; a complete stage
is skipped. A stage that runs (again: its folder was deleted to redo it) first removes the
folders of every later stage, which depend on it. An interrupted training stage leaves
``STAGE/last`` (the loop saves on SIGINT/SIGTERM); ``--resume`` continues it from there, and
without ``--resume`` the run refuses to discard it.

``--budget 60m`` measures each training stage's step time on a few synthetic steps of the
real architecture and batch size, then gives the stages steps to fill
:data:`TRAINING_SHARE` of the budget (the rest covers loading, encoding, export and the
verdict), split by :data:`STAGE_SHARES`; each training stage is sized again when it starts,
from the time the finished ones really took. The plan is written to ``RUN/plan.json`` and reused
by every later run with the same ``--budget``, so a resumed stage keeps its step count and
learning-rate schedule.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from mvld.common.dataset import FrameSetFolder
from mvld.common.errors import ConfigError
from mvld.model.checkpoint import checkpoint_paths, load_autoencoder
from mvld.receiver.ridge_imputer import RIDGE_FILE
from mvld.train.config import (
    AETrainConfig,
    ClassifierTrainConfig,
    CommonTrainConfig,
    ScoreTrainConfig,
    TrainAllConfig,
    load_config,
    parse_budget,
)
from mvld.train.distributed import DistributedContext
from mvld.train.loop import autocast
from mvld.train.state import state_path
from mvld.train.verdict import TrainingEvidence, build_verdict, report_markdown

log = logging.getLogger(__name__)

STAGES = ("ae", "latents", "score", "classifier", "export", "eval")
TRAINING_STAGES = ("ae", "score", "classifier")
MARKER = "done.json"
PLAN_FILE = "plan.json"
VERDICT_FILE = "verdict.json"
REPORT_FILE = "report.md"
TRAINING_SHARE = 0.8  # of --budget, for the training steps
STAGE_SHARES = {"ae": 0.4, "score": 0.45, "classifier": 0.15}  # of the training time
MIN_STEPS = 20  # the fewest steps a budget gives a stage
VALIDATIONS = 8  # validations (and checkpoints) per training stage, unless a table sets them
PROBE_STEPS = 3  # timed synthetic steps per stage (after one warm-up step)

StageConfigT = TypeVar("StageConfigT", bound=CommonTrainConfig)


# ---------------------------------------------------------------- stage markers


def stage_folder(run: Path, stage: str) -> Path:
    """The folder of ``stage`` in the run folder."""
    return run / stage


def completed(run: Path, stage: str) -> dict | None:
    """The marker of a complete stage, or ``None`` (absent, unreadable, or an output gone)."""
    path = stage_folder(run, stage) / MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("stage") != stage:
        return None
    if not all((run / name).exists() for name in marker.get("outputs", [])):
        return None
    return marker


def mark_complete(run: Path, stage: str, outputs: list[Path], info: dict | None = None) -> None:
    """Write ``STAGE/done.json`` atomically, after every listed output exists."""
    missing = [str(p) for p in outputs if not p.exists()]
    if missing:
        raise RuntimeError(f"stage {stage} finished without its outputs {missing}")
    marker = {
        "stage": stage,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "outputs": [str(p.relative_to(run)) for p in outputs],
        **(info or {}),
    }
    path = stage_folder(run, stage) / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, path)


def invalidate_after(run: Path, stage: str) -> None:
    """Remove the folders of the stages after ``stage``: they were built on its old output.

    Called before ``stage`` runs; an interrupted later stage cannot be resumed on top of a
    redone earlier one (its encoder or latents changed), so nothing of it is kept.
    """
    for later in STAGES[STAGES.index(stage) + 1 :]:
        folder = stage_folder(run, later)
        if folder.is_dir():
            log.info("removing %s: it depends on %s, which runs again", folder, stage)
            shutil.rmtree(folder)


# ---------------------------------------------------------------- the budget


@dataclass
class BudgetPlan:
    """Steps per training stage, and what they were sized from."""

    budget: str  # as given, e.g. "60m"
    steps: dict[str, int]
    step_seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``RUN/plan.json``)."""
        return {
            "budget": self.budget,
            "budget_s": parse_budget(self.budget),
            "steps": self.steps,
            "step_seconds": self.step_seconds,
        }


def steps_for(
    stage: str, budget_s: float, spent_s: float, pending: list[str], step_seconds: dict[str, float]
) -> int:
    """Steps of ``stage`` so that it and the ``pending`` stages after it fill what is left.

    What is left is ``TRAINING_SHARE`` of the budget minus the wall-clock seconds the finished
    training stages took (data loading and validation included), shared by
    :data:`STAGE_SHARES` among the pending stages (``stage`` among them).
    """
    left = max(0.0, budget_s * TRAINING_SHARE - spent_s)
    share = STAGE_SHARES[stage] / sum(STAGE_SHARES[s] for s in pending)
    return max(MIN_STEPS, int(left * share / max(step_seconds[stage], 1e-6)))


def plan_steps(budget_s: float, step_seconds: dict[str, float]) -> dict[str, int]:
    """Steps per stage so that the training stages fill ``TRAINING_SHARE`` of the budget.

    ``step_seconds`` holds the stages that will train; their shares are renormalised (no
    classifier without labels).
    """
    return {
        stage: steps_for(stage, budget_s, 0.0, list(step_seconds), step_seconds)
        for stage in step_seconds
    }


def _timed_steps(step: Callable[[], None], clock: Callable[[], float]) -> float:
    """Median seconds of ``PROBE_STEPS`` calls of ``step`` after one warm-up call."""
    step()
    times = []
    for _ in range(PROBE_STEPS):
        start = clock()
        step()
        times.append(clock() - start)
    return statistics.median(times)


def _optimiser_step(model: nn.Module, loss_of: Callable[[], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure_step_seconds(
    stage: str,
    config: CommonTrainConfig,
    views: int,
    ae_config: AETrainConfig,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds of one training step of ``stage``: its real network and batch, synthetic data."""
    from mvld.common.preprocess import PreprocessConfig
    from mvld.model.autoencoder import Autoencoder
    from mvld.model.classifier import ClassifierConfig, ViewClassifier
    from mvld.model.score_net import make_score_net
    from mvld.model.sde import VPSDE
    from mvld.train.autoencoder_training import autoencoder_config_for, reconstruction_loss
    from mvld.train.score_training import (
        draw_observed_masks,
        multi_time_loss,
        score_net_config_for,
    )

    generator = torch.Generator().manual_seed(0)
    batch = config.batch_size
    ae_arch = autoencoder_config_for(ae_config)
    model: nn.Module
    if stage == "ae":
        model = Autoencoder(ae_arch).to(device)
        preprocess = PreprocessConfig(height=ae_config.image_size, width=ae_config.image_size)
        size = ae_config.image_size
        images = (torch.rand(batch, 3, size, size, generator=generator) * 2 - 1).to(device)

        def loss_of() -> torch.Tensor:
            with autocast(device, config.precision):
                out = model(images)
            return reconstruction_loss(out.float(), images, preprocess, ae_config.ssim_weight)
    elif stage == "score":
        assert isinstance(config, ScoreTrainConfig)
        model = make_score_net(score_net_config_for(config, views, ae_arch)).to(device)
        sde = VPSDE(beta_min=config.beta_min, beta_max=config.beta_max)
        z0 = torch.randn(batch, views, ae_arch.latent_dim, generator=generator).to(device)
        observed = draw_observed_masks(batch, views, config.cond_prob, generator).to(device)
        t = (0.5 * torch.ones(batch)).to(device)
        noise = torch.randn(z0.shape, generator=generator).to(device)

        def loss_of() -> torch.Tensor:
            with autocast(device, config.precision):
                return multi_time_loss(model, sde, z0, observed, t, noise).mean()
    else:
        assert isinstance(config, ClassifierTrainConfig)
        model = ViewClassifier(
            ClassifierConfig(
                num_classes=10,
                image_size=config.image_size,
                channels=config.channels,
                convs_per_stage=config.convs_per_stage,
            )
        ).to(device)
        size = config.image_size
        images = (torch.rand(batch, 3, size, size, generator=generator) * 2 - 1).to(device)
        labels = torch.randint(0, 10, (batch,), generator=generator).to(device)

        def loss_of() -> torch.Tensor:
            with autocast(device, config.precision):
                logits = model(images)
            return nn.functional.cross_entropy(logits.float(), labels)

    return _timed_steps(_optimiser_step(model, loss_of), clock)


# ---------------------------------------------------------------- stage configurations


def _config_as(
    configs: dict[str, CommonTrainConfig], stage: str, cls: type[StageConfigT]
) -> StageConfigT:
    """``configs[stage]``, checked to be of the stage's own config class ``cls``."""
    config = configs[stage]
    if not isinstance(config, cls):
        raise TypeError(
            f"the {stage} stage's config is a {type(config).__name__}, not a {cls.__name__}"
        )
    return config


def _cadence(table: dict[str, Any], steps: int) -> dict[str, int]:
    """``VALIDATIONS`` validations and checkpoints per stage, unless the table sets them."""
    every = max(1, steps // VALIDATIONS)
    return {name: every for name in ("val_every", "checkpoint_every") if name not in table}


def stage_configs(
    config: TrainAllConfig, tables: dict[str, dict[str, Any]], steps: dict[str, int] | None = None
) -> dict[str, CommonTrainConfig]:
    """Each training stage's config: table options < the run's own < ``steps`` (a budget)."""
    run = Path(config.out)
    shared = {
        "data": config.data,
        "device": config.device,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "threads": config.threads,
        "skip_bad": config.skip_bad,
        "progress": config.progress,
    }
    steps = steps or {}
    built: dict[str, CommonTrainConfig] = {}
    for stage, cls in (
        ("ae", AETrainConfig),
        ("score", ScoreTrainConfig),
        ("classifier", ClassifierTrainConfig),
    ):
        table = dict(tables.get(stage, {}))
        values = table | shared | {"out": str(stage_folder(run, stage)), "resume": False}
        if stage == "score":
            values["ae"] = str(stage_folder(run, "ae") / "best")
        if stage == "classifier" and "image_size" not in table:
            values["image_size"] = _config_as(built, "ae", AETrainConfig).image_size
        if stage in steps:
            values["steps"] = steps[stage]
        stage_steps = int(values.get("steps", cls().steps))
        values |= _cadence(table, stage_steps)
        built[stage] = load_config(cls, stage, None, values)
    return built


def _views_and_labels(config: TrainAllConfig) -> tuple[int, bool]:
    with FrameSetFolder(config.data, skip_bad=config.skip_bad) as folder:
        labels = folder.labels
        labelled = labels is not None and any(v is not None for v in labels.values())
        return len(folder.cameras), labelled


def load_or_make_plan(
    config: TrainAllConfig,
    tables: dict[str, dict[str, Any]],
    views: int,
    labelled: bool,
    device: torch.device,
) -> BudgetPlan | None:
    """The budget's plan: ``RUN/plan.json`` when it was made for the same budget, else measured.

    Reusing it keeps an interrupted stage's step count, so ``--resume`` repeats its schedule.
    """
    if not config.budget:
        return None
    path = Path(config.out) / PLAN_FILE
    try:
        saved = json.loads(path.read_text())
        if saved.get("budget") == config.budget:
            log.info("budget: reusing the plan of %s (%s)", path, saved["steps"])
            return BudgetPlan(config.budget, saved["steps"], saved["step_seconds"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        pass
    budget_s = parse_budget(config.budget)
    configs = stage_configs(config, tables)
    stages = [s for s in TRAINING_STAGES if s != "classifier" or labelled]
    seconds = {}
    for stage in stages:
        seconds[stage] = measure_step_seconds(
            stage, configs[stage], views, _config_as(configs, "ae", AETrainConfig), device
        )
        log.info(
            "budget: %s step %.3f s (batch %d)", stage, seconds[stage], configs[stage].batch_size
        )
    plan = BudgetPlan(config.budget, plan_steps(budget_s, seconds), seconds)
    log.info("budget %s: steps %s", config.budget, plan.steps)
    save_plan(Path(config.out), plan)
    return plan


def save_plan(run: Path, plan: BudgetPlan) -> None:
    """Write ``RUN/plan.json`` atomically."""
    _write_atomic(run / PLAN_FILE, json.dumps(plan.to_dict(), indent=1) + "\n")


def resize_for_budget(run: Path, stage: str, plan: BudgetPlan) -> int:
    """Re-size a training stage that starts now from the time the finished ones really took.

    The first plan only knows step times; loading, validation and a machine whose load
    changed make stages take longer or shorter, and the stages still to come absorb it.
    The new count is saved in the plan, so that a resumed stage keeps it.
    """
    markers = {s: completed(run, s) for s in plan.step_seconds}
    spent = sum(float(m.get("seconds", 0.0)) for m in markers.values() if m)
    pending = [s for s in plan.step_seconds if markers[s] is None]
    plan.steps[stage] = steps_for(
        stage, parse_budget(plan.budget), spent, pending, plan.step_seconds
    )
    save_plan(run, plan)
    log.info(
        "budget: %s gets %d steps (%.0f s of training spent so far)",
        stage,
        plan.steps[stage],
        spent,
    )
    return plan.steps[stage]


# ---------------------------------------------------------------- running the stages


@dataclass
class PipelineResult:
    """What the command prints: the model, the report and where it lies."""

    model: Path
    report: str
    verdict: dict
    run: Path


def _resume_flag(config: TrainAllConfig, stage: str) -> bool:
    """Whether a training stage continues from ``STAGE/last``; refuses to discard one."""
    interrupted = state_path(stage_folder(Path(config.out), stage) / "last").is_file()
    if interrupted and not config.resume:
        raise ConfigError(
            f"{stage_folder(Path(config.out), stage)} holds an interrupted run: "
            "pass --resume to continue it, or delete that folder to start over"
        )
    return interrupted and stage != "classifier"  # the classifier has no --resume


def train_stage(config: CommonTrainConfig, ctx: DistributedContext) -> Path:
    """Train the stage ``config`` belongs to (its class names it)."""
    if isinstance(config, AETrainConfig):
        from mvld.train.autoencoder_training import train_autoencoder

        return train_autoencoder(config, ctx)
    if isinstance(config, ScoreTrainConfig):
        from mvld.train.score_training import train_score

        return train_score(config, ctx)
    if isinstance(config, ClassifierTrainConfig):
        from mvld.train.classifier_training import train_classifier

        return train_classifier(config, ctx)
    raise TypeError(f"no training stage takes a {type(config).__name__}")


def _model_files(folder: Path, name: str) -> list[Path]:
    return list(checkpoint_paths(folder / name))


def encode_latent_cache(config: TrainAllConfig, ae: Path, score_out: Path) -> Path:
    """Encode every view with ``ae`` into the cache the score stage reads."""
    from mvld.train.frames import load_frame_arrays
    from mvld.train.latents import encode_frame_arrays, save_latent_cache

    autoencoder, preprocess, fingerprint = load_autoencoder(ae)
    arrays = load_frame_arrays(config.data, preprocess.height, preprocess.width, config.skip_bad)
    latents = encode_frame_arrays(autoencoder, preprocess, arrays)
    score_out.mkdir(parents=True, exist_ok=True)
    path = score_out / "latents.safetensors"
    save_latent_cache(path, latents, torch.from_numpy(arrays.present), fingerprint, config.data)
    log.info("latents: %d frame sets x %d views encoded -> %s", *arrays.present.shape, path)
    return path


def _validation_history(folder: Path, key: str) -> list[float]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r[key] for r in records if key in r}  # a resumed run appends
    return [by_step[s] for s in sorted(by_step)]


def save_receiver_ridge(
    path: Path, train_z: torch.Tensor, fingerprint: str, alpha: float = 1.0
) -> Path:
    """Fit the ridge baseline for every presence pattern and save it for ``--imputer ridge``."""
    from mvld.receiver.ridge_imputer import save_ridge_weights
    from mvld.train.baselines import RidgeRegressor

    ridge = RidgeRegressor(train_z, alpha)
    masks = [m for m in itertools.product((False, True), repeat=train_z.shape[1]) if not all(m)]
    return save_ridge_weights(path, {m: ridge.fit(m) for m in masks}, fingerprint, alpha)


def evaluate_run(
    config: TrainAllConfig,
    model: Path,
    classifier: Path | None,
    ae_folder: Path | None = None,
    score_folder: Path | None = None,
    ridge_out: Path | None = None,
) -> dict:
    """The verdict of ``model`` on the held-out frame sets (fast sampler against baselines).

    With ``ridge_out`` the ridge baseline of the verdict is also saved there for the receiver.
    """
    from mvld.receiver.imputation import DEFAULT_SAMPLER, DEFAULT_STEPS
    from mvld.train.evaluation import (
        EvalConfig,
        Judge,
        SamplerSpec,
        build_rows,
        load_inputs,
        missing_patterns,
        run_methods,
        score_method,
        score_references,
    )

    spec = SamplerSpec(DEFAULT_SAMPLER, DEFAULT_STEPS)
    eval_config = EvalConfig(
        data=config.data,
        out=str(stage_folder(Path(config.out), "eval")),
        model=str(model),
        classifier=None if classifier is None else str(classifier),
        samplers=(spec,),
        fid_samples=0,
        frames=config.eval_frames,
        val_fraction=config.val_fraction,
        device=config.device,
        seed=config.seed,
    )
    inputs = load_inputs(eval_config)
    judge = Judge(inputs.classifier, inputs.classifier_preprocess, None, 0)
    patterns = missing_patterns(len(inputs.cameras))
    real, recon = score_references(inputs, judge)
    runs = run_methods(inputs, eval_config, patterns)
    per_method = {run.label: score_method(inputs, judge, run) for run in runs}
    rows = build_rows(inputs, patterns, runs, per_method, real, recon, 0)
    if recon.psnr is None or recon.ssim is None:
        raise RuntimeError(
            "reconstructed views are judged against the true views: they must have PSNR and SSIM"
        )
    evidence = TrainingEvidence(
        reconstruction_psnr=float(recon.psnr.mean()),
        reconstruction_ssim=float(recon.ssim.mean()),
        ae_val_psnr=_validation_history(ae_folder, "val_psnr") if ae_folder else [],
        score_val_loss=_validation_history(score_folder, "val_cond") if score_folder else [],
        train_frame_sets=int(inputs.split["train_complete"]),
        labelled=inputs.classifier is not None,
    )
    verdict = build_verdict(rows, spec.label, evidence)
    verdict["data"] = inputs.split
    if ridge_out is not None:
        save_receiver_ridge(ridge_out, inputs.train_z, inputs.model.fingerprint)
    return verdict


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_pipeline(
    config: TrainAllConfig, ctx: DistributedContext, tables: dict[str, dict[str, Any]] | None = None
) -> PipelineResult:
    """Run (or skip, or resume) every stage into ``config.out``; the verdict at the end."""
    if ctx.world_size > 1:
        raise ConfigError(
            "mvld-train all runs in one process; under torchrun use the stage "
            "commands (mvld-train ae / score / classifier)"
        )
    tables = tables or {}
    run = Path(config.out)
    run.mkdir(parents=True, exist_ok=True)
    views, labelled = _views_and_labels(config)
    plan = load_or_make_plan(config, tables, views, labelled, ctx.device)
    configs = stage_configs(config, tables, plan.steps if plan else None)
    stages = [s for s in STAGES if s != "classifier" or labelled]
    if not labelled:
        log.info("no labels in %s: no classifier, the verdict compares PSNR only", config.data)
    ae_best, score_best = run / "ae" / "best", run / "score" / "best"
    classifier = run / "classifier" / "last" if labelled else None
    verdict: dict | None = None
    for number, stage in enumerate(stages, start=1):
        marker = completed(run, stage)
        if marker is not None:
            log.info(
                "stage %d/%d %s: complete (%s), skipped",
                number,
                len(stages),
                stage,
                stage_folder(run, stage) / MARKER,
            )
            continue
        log.info("stage %d/%d %s", number, len(stages), stage)
        resume = _resume_flag(config, stage) if stage in TRAINING_STAGES else False
        invalidate_after(run, stage)
        folder = stage_folder(run, stage)
        if stage in TRAINING_STAGES:
            if plan is not None and not resume:
                resize_for_budget(run, stage, plan)
                configs = stage_configs(config, tables, plan.steps)
            stage_config = configs[stage]
            stage_config.resume = resume
            began = time.monotonic()
            train_stage(stage_config, ctx)
            name = "last" if stage == "classifier" else "best"
            mark_complete(
                run,
                stage,
                _model_files(folder, name),
                {"steps": stage_config.steps, "seconds": time.monotonic() - began},
            )
        elif stage == "latents":
            folder.mkdir(parents=True, exist_ok=True)
            cache = encode_latent_cache(config, ae_best, stage_folder(run, "score"))
            mark_complete(run, stage, [cache])
        elif stage == "export":
            from mvld.export.onnx_export import ExportOptions, export_model

            options = ExportOptions(exporter=config.exporter, frames=Path(config.data))
            exported = export_model(score_best, folder, options)
            mark_complete(run, stage, [Path(g.path) for g in exported] + [folder / "model.json"])
        else:
            folder.mkdir(parents=True, exist_ok=True)
            ridge = run / "score" / RIDGE_FILE  # beside the checkpoint: --imputer ridge
            verdict = evaluate_run(config, score_best, classifier, run / "ae", run / "score", ridge)
            report = report_markdown(verdict)
            text = json.dumps(verdict, indent=1) + "\n"
            _write_atomic(run / VERDICT_FILE, text)
            _write_atomic(run / "score" / VERDICT_FILE, text)  # beside the checkpoint
            _write_atomic(run / REPORT_FILE, report)
            mark_complete(run, stage, [run / VERDICT_FILE, run / REPORT_FILE, ridge])
    if verdict is None:
        verdict = json.loads((run / VERDICT_FILE).read_text())
    report = (run / REPORT_FILE).read_text()
    return PipelineResult(model=score_best, report=report, verdict=verdict, run=run)
