"""``mvld-eval``'s measurement: imputation quality and cost for every missing-view pattern.

Held-out frame sets (the last ``val_fraction`` of the dataset, the same contiguous tail that
training validates on, i.e. whole held-out scenes) are encoded; for every pattern of missing
views (at least one observed, at least one missing) each method fills the missing latents, the
decoder turns them into images, and each imputed view is judged against the true view:

* coherence: the label classifier (``mvld-train classifier``) on the imputed view agrees with
  the frame-set label, next to the same classifier on the real views (the ceiling) and on the
  reconstructed views (decoder of the true latents: what a perfect imputer could reach);
* FID with real Inception features (``metrics_fid``) on the first ``fid_samples`` imputed
  views of a pattern, against the real views of the same frame sets and cameras;
* a quick Fréchet distance on the classifier's penultimate features (every evaluated view);
* PSNR and SSIM against the true view; NFE and seconds per frame set.

Methods: every requested sampler (``Imputer``) and the baselines of ``baselines``, fitted on
the complete frame sets of the training scenes. ``tradeoff`` adds bytes per frame set.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mvld.common.checkpoint import DEFAULT_MODEL, MVLDModel, checkpoint_paths, load_mvld_model
from mvld.common.errors import ConfigError, DatasetError
from mvld.common.preprocess import PreprocessConfig, postprocess_images, preprocess_images
from mvld.hardware import cpu_name
from mvld.receiver.imputation import DEFAULT_SAMPLER, DEFAULT_STEPS, Imputer
from mvld.receiver.sampler import sampler_names
from mvld.train.baselines import LatentBaseline, MeanLatent, NearestNeighbour, RidgeRegressor
from mvld.train.classifier import ViewClassifier, load_classifier
from mvld.train.eval_summary import Group, check_targets, group_row, groups_of
from mvld.train.frames import NO_LABEL, evenly_spaced, load_frame_arrays, split_train_val
from mvld.train.image_quality import psnr, ssim
from mvld.train.latents import encode_frame_arrays
from mvld.train.metrics_fid import InceptionFeatures
from mvld.train.tradeoff import codec_sweep, latent_tradeoff, matched_budgets

log = logging.getLogger(__name__)

DEFAULT_CLASSIFIER = DEFAULT_MODEL.with_name("default_classifier")
DEFAULT_SAMPLERS = "dpmpp_2m_sde:20,dpmpp_2m:20,heun:10,euler_maruyama:1000"
SCHEMA = "mvld-eval/1"


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler at a number of steps, written ``name:steps`` on the command line."""

    name: str
    steps: int

    @property
    def label(self) -> str:
        """The method name used in tables: ``name:steps``."""
        return f"{self.name}:{self.steps}"


def parse_samplers(text: str) -> tuple[SamplerSpec, ...]:
    """``"dpmpp_2m:20,heun:10"`` -> specs; unknown names list the registered samplers."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, steps = item.partition(":")
        if name not in sampler_names():
            raise ConfigError(f"unknown sampler {name!r}; valid: {', '.join(sampler_names())}")
        if not steps.isdigit() or int(steps) < 2:
            raise ConfigError(f"sampler {item!r}: write name:steps with steps >= 2")
        specs.append(SamplerSpec(name, int(steps)))
    if not specs:
        raise ConfigError("--samplers names no sampler")
    if len({s.label for s in specs}) != len(specs):
        raise ConfigError(f"--samplers repeats a sampler: {text}")
    return tuple(specs)


@dataclass
class EvalConfig:
    """Everything one evaluation run needs; validated once by the CLI."""

    data: str
    out: str
    model: str | None = None  # None: the packaged default model
    classifier: str | None = None  # None: the packaged default classifier
    samplers: tuple[SamplerSpec, ...] = field(default_factory=lambda: parse_samplers(
        DEFAULT_SAMPLERS))
    fid_samples: int = 100  # imputed views per (method, pattern) for Inception FID; 0: skip
    frames: int = 400  # held-out frame sets evaluated (evenly spaced over the held-out tail)
    val_fraction: float = 0.1
    device: str = "cpu"
    seed: int = 0
    grid_rows: int = 4
    grid_samples: int = 3
    throughput_batch: int = 64
    quick: bool = False

    def __post_init__(self) -> None:
        if self.frames < 2 or self.fid_samples < 0 or self.fid_samples == 1:
            raise ConfigError("need --frames >= 2 and --fid-samples 0 or >= 2")
        if not 0 < self.val_fraction < 1:
            raise ConfigError("val_fraction must be in (0, 1)")


def missing_patterns(views: int) -> list[tuple[bool, ...]]:
    """Presence masks with at least one view observed and one missing, fewest missing first."""
    masks = [m for m in itertools.product((False, True), repeat=views) if any(m) and not all(m)]
    return sorted(masks, key=lambda m: (sum(not p for p in m), m))


def pattern_name(mask: tuple[bool, ...], cameras: list[str]) -> str:
    """``"cam0,cam2 missing"`` for the views with ``mask[v] == False``."""
    return ",".join(c for c, p in zip(cameras, mask, strict=True) if not p) + " missing"


@dataclass
class EvalInputs:
    """Model, judge and held-out data of one evaluation."""

    model: MVLDModel
    classifier: ViewClassifier
    classifier_preprocess: PreprocessConfig
    cameras: list[str]
    train_z: torch.Tensor  # standardised latents of complete training frame sets [N_train, V, D]
    images: np.ndarray  # uint8 [N, V, H, W, 3] held-out views at the model's size
    labels: np.ndarray  # int64 [N]
    latents: torch.Tensor  # raw latents [N, V, D] of the held-out views
    stems: list[str]
    split: dict


def _resolve(path: str | None, default: Path, what: str) -> Path:
    if path is not None:
        return Path(path)
    if not checkpoint_paths(default)[0].is_file():
        raise ConfigError(f"no default {what} is packaged in this installation; name one "
                          f"with --{what}")
    return default


def _select(arrays, config: EvalConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """Complete training frame sets, evaluated held-out frame sets, and the split's record."""
    train_all, test_all = split_train_val(len(arrays.stems), config.val_fraction)
    complete = arrays.present.all(1)
    train_idx = train_all[complete[train_all]]
    test_idx = test_all[complete[test_all] & (arrays.labels[test_all] != NO_LABEL)]
    if len(test_idx) < 2 or len(train_idx) < 2:
        raise DatasetError(f"{config.data}: fewer than 2 complete (labelled) frame sets in the "
                           "training or held-out split")
    chosen = evenly_spaced(test_idx, config.frames)
    split = {"val_fraction": config.val_fraction, "frame_sets": len(arrays.stems),
             "train_complete": len(train_idx), "held_out": len(test_all),
             "held_out_complete_labelled": len(test_idx), "evaluated": len(chosen),
             "held_out_stems": [arrays.stems[test_all[0]], arrays.stems[test_all[-1]]]}
    return train_idx, chosen, split


def load_inputs(config: EvalConfig) -> EvalInputs:
    """Load model, classifier and dataset; encode; select held-out complete frame sets."""
    if not Path(config.data).is_dir():
        raise DatasetError(f"{config.data}: dataset folder does not exist")
    model_path = _resolve(config.model, DEFAULT_MODEL, "model")
    classifier_path = _resolve(config.classifier, DEFAULT_CLASSIFIER, "classifier")
    model = load_mvld_model(model_path, device=config.device)
    classifier, classifier_preprocess = load_classifier(classifier_path)
    arrays = load_frame_arrays(config.data, model.preprocess.height, model.preprocess.width)
    if arrays.num_views != model.num_views:
        raise DatasetError(f"{config.data} has {arrays.num_views} cameras; the model was "
                           f"trained for {model.num_views}")
    train_idx, chosen, split = _select(arrays, config)
    log.info("encoding %d frame sets (%d complete training, %d held-out evaluated)",
             len(arrays.stems), len(train_idx), len(chosen))
    latents = encode_frame_arrays(model.autoencoder, model.preprocess, arrays)
    split |= {"model": str(model_path), "classifier": str(classifier_path)}
    return EvalInputs(model=model, classifier=classifier.to(config.device),
                      classifier_preprocess=classifier_preprocess, cameras=arrays.cameras,
                      train_z=model.latent_stats.standardise(latents[train_idx]),
                      images=arrays.images[chosen], labels=arrays.labels[chosen],
                      latents=latents[chosen], stems=[arrays.stems[i] for i in chosen],
                      split=split)


# ---------------------------------------------------------------- judging views


@dataclass
class ViewScores:
    """Per-image judgements of M views (frame-major order)."""

    correct: np.ndarray  # bool [M]: classifier prediction == label
    features: np.ndarray  # [M, F] classifier penultimate features
    psnr: np.ndarray | None  # [M] dB against the true view (None for the real views)
    ssim: np.ndarray | None  # [M]
    inception: np.ndarray | None  # [min(M, fid_samples), 2048]


class Judge:
    """Classifier, Inception and the true views: scores any set of views."""

    def __init__(self, classifier: ViewClassifier, preprocess: PreprocessConfig,
                 inception: InceptionFeatures | None, fid_samples: int, batch: int = 256) -> None:
        self.classifier, self.preprocess = classifier.eval(), preprocess
        self.inception, self.fid_samples, self.batch = inception, fid_samples, batch

    @torch.inference_mode()
    def classify(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(predictions [M], penultimate features [M, F])`` of uint8 views."""
        device = next(self.classifier.parameters()).device
        predictions, features = [], []
        for start in range(0, len(images), self.batch):
            x = torch.from_numpy(preprocess_images(images[start:start + self.batch],
                                                   self.preprocess)).to(device)
            feats = self.classifier.features(x)
            predictions.append(self.classifier.head(feats).argmax(1).cpu().numpy())
            features.append(feats.double().cpu().numpy())
        return np.concatenate(predictions), np.concatenate(features)

    def score(self, images: np.ndarray, labels: np.ndarray, truth: np.ndarray | None,
              inception_count: int | None = None) -> ViewScores:
        """Judge uint8 views ``[M, H, W, 3]`` with their labels and (optionally) true views.

        Inception features are taken for the first ``inception_count`` views (default:
        ``fid_samples``); none without an Inception network.
        """
        predictions, features = self.classify(images)
        count = self.fid_samples if inception_count is None else inception_count
        inception = None
        if self.inception is not None and count:
            inception = self.inception(images[:count])
        return ViewScores(correct=predictions == labels, features=features,
                          psnr=None if truth is None else psnr(images, truth),
                          ssim=None if truth is None else ssim(images, truth),
                          inception=inception)


@torch.no_grad()
def decode_latents(model: MVLDModel, latents: torch.Tensor, batch: int = 512) -> np.ndarray:
    """Raw latents ``[M, D]`` -> uint8 RGB views ``[M, H, W, 3]`` through the decoder."""
    device = next(model.autoencoder.parameters()).device
    parts = [postprocess_images(model.autoencoder.decoder(latents[i:i + batch].to(device))
                                .float().cpu().numpy(), model.preprocess)
             for i in range(0, len(latents), batch)]
    return np.concatenate(parts)


# ---------------------------------------------------------------- methods


@dataclass
class MethodRun:
    """Imputed raw latents of every pattern for one method, and its cost."""

    label: str
    kind: str  # "sampler" or "baseline"
    latents: dict[tuple[bool, ...], torch.Tensor]  # pattern -> raw latents [N, V, D]
    nfe: int
    seconds_per_frame_set: float


def _masks(mask: tuple[bool, ...], count: int) -> torch.Tensor:
    return torch.tensor(mask).expand(count, -1).clone()


def run_sampler(inputs: EvalInputs, spec: SamplerSpec, patterns: list[tuple[bool, ...]],
                seed: int) -> MethodRun:
    """Impute every pattern with one sampler: one batched call over all patterns' rows."""
    imputer = Imputer.from_model(inputs.model, sampler=spec.name, steps=spec.steps)
    count = len(inputs.latents)
    present = torch.cat([_masks(mask, count) for mask in patterns])  # [P * N, V]
    log.info("%s: imputing %d patterns x %d frame sets", spec.label, len(patterns), count)
    result = imputer(inputs.latents.repeat(len(patterns), 1, 1), present, seed=seed)
    parts = result.latents.split(count)
    log.info("%s: %d NFE, %.2f s", spec.label, result.nfe, result.seconds)
    return MethodRun(spec.label, "sampler", dict(zip(patterns, parts, strict=True)), result.nfe,
                     result.seconds / len(present))


def fit_baselines(train_z: torch.Tensor) -> dict[str, LatentBaseline]:
    """The baselines of DESIGN.md section 6, fitted on standardised training latents."""
    return {"mean_latent": MeanLatent(train_z), "nearest_neighbour": NearestNeighbour(train_z),
            "ridge_regressor": RidgeRegressor(train_z)}


def run_baseline(inputs: EvalInputs, name: str, baseline: LatentBaseline,
                 patterns: list[tuple[bool, ...]]) -> MethodRun:
    """Impute every pattern with a baseline in standardised space."""
    stats = inputs.model.latent_stats
    z = stats.standardise(inputs.latents)
    out, start = {}, time.perf_counter()
    for mask in patterns:
        out[mask] = stats.destandardise(baseline(z, _masks(mask, len(z))))
    seconds = time.perf_counter() - start
    log.info("%s: every pattern imputed in %.2f s", name, seconds)
    return MethodRun(name, "baseline", out, 0, seconds / (len(patterns) * len(z)))


# ---------------------------------------------------------------- scoring


def score_references(inputs: EvalInputs, judge: Judge) -> tuple[ViewScores, ViewScores]:
    """Scores of every real and every reconstructed view, ``[N * V]`` frame-major.

    Inception features cover the first ``fid_samples`` frame sets, enough for any pattern.
    """
    count, views = inputs.images.shape[:2]
    real = inputs.images.reshape(-1, *inputs.images.shape[2:])
    labels = np.repeat(inputs.labels, views)
    log.info("scoring %d real and reconstructed views", len(real))
    recon = decode_latents(inputs.model, inputs.latents.reshape(count * views, -1))
    limit = min(judge.fid_samples, count) * views
    return (judge.score(real, labels, None, inception_count=limit),
            judge.score(recon, labels, real, inception_count=limit))


def subset(scores: ViewScores, index: np.ndarray, fid_samples: int) -> ViewScores:
    """The scores of the views at ``index`` (Inception: the first ``fid_samples`` of them)."""
    inception = None
    if scores.inception is not None and fid_samples:
        head = index[:fid_samples]
        if head.max() >= len(scores.inception):
            raise ValueError("reference Inception features do not cover the subset")
        inception = scores.inception[head]
    return ViewScores(correct=scores.correct[index], features=scores.features[index],
                      psnr=None if scores.psnr is None else scores.psnr[index],
                      ssim=None if scores.ssim is None else scores.ssim[index],
                      inception=inception)


def missing_index(mask: tuple[bool, ...], count: int) -> np.ndarray:
    """Frame-major flat indices ``n * V + v`` of the missing views of ``count`` frame sets."""
    missing = np.array([v for v, p in enumerate(mask) if not p])
    return (np.arange(count)[:, None] * len(mask) + missing[None, :]).reshape(-1)


def score_method(inputs: EvalInputs, judge: Judge, run: MethodRun
                 ) -> dict[tuple[bool, ...], ViewScores]:
    """Decode and judge the imputed views of every pattern, frame-major ``[N * m]``."""
    flat_truth = inputs.images.reshape(-1, *inputs.images.shape[2:])
    views = inputs.images.shape[1]
    out = {}
    for mask, latents in run.latents.items():
        index = missing_index(mask, len(inputs.latents))
        images = decode_latents(inputs.model, latents.reshape(-1, latents.shape[-1])[index])
        out[mask] = judge.score(images, np.repeat(inputs.labels, views)[index],
                                flat_truth[index])
    log.info("%s: scored", run.label)
    return out


# ---------------------------------------------------------------- grids and throughput


@dataclass
class GridExample:
    """Image rows of one pattern: observed views, true missing views, K imputed samples."""

    pattern: str
    stems: list[str]
    observed: np.ndarray  # uint8 [R, o, H, W, 3]
    truth: np.ndarray  # uint8 [R, m, H, W, 3]
    samples: np.ndarray  # uint8 [R, K, m, H, W, 3]


def sample_grids(inputs: EvalInputs, spec: SamplerSpec, patterns: list[tuple[bool, ...]],
                 rows: int, samples: int, seed: int) -> list[GridExample]:
    """K samples of each pattern's missing views for ``rows`` evenly spaced frame sets."""
    pick = np.unique(np.linspace(0, len(inputs.latents) - 1, rows).round().astype(int))
    imputer = Imputer.from_model(inputs.model, sampler=spec.name, steps=spec.steps)
    out = []
    for mask in patterns:
        result = imputer(inputs.latents[pick], _masks(mask, len(pick)), samples=samples,
                         seed=seed)
        observed = [v for v, p in enumerate(mask) if p]
        missing = [v for v, p in enumerate(mask) if not p]
        drawn = result.samples[:, :, missing]  # [R, K, m, D]
        images = decode_latents(inputs.model, drawn.reshape(-1, drawn.shape[-1]))
        out.append(GridExample(pattern=pattern_name(mask, inputs.cameras),
                               stems=[inputs.stems[i] for i in pick],
                               observed=inputs.images[pick][:, observed],
                               truth=inputs.images[pick][:, missing],
                               samples=images.reshape(*drawn.shape[:3], *images.shape[1:])))
    return out


def imputation_throughput(inputs: EvalInputs, batch: int, seed: int, repeats: int = 3) -> dict:
    """Frame sets per second of the default sampler, one view of each frame set missing."""
    views = inputs.latents.shape[1]
    rows = torch.arange(batch) % len(inputs.latents)
    present = torch.ones(batch, views, dtype=torch.bool)
    present[torch.arange(batch), torch.arange(batch) % views] = False
    imputer = Imputer.from_model(inputs.model, sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS)
    imputer(inputs.latents[rows], present, seed=seed)  # warm-up
    seconds = []
    for repeat in range(repeats):
        seconds.append(imputer(inputs.latents[rows], present, seed=seed + repeat).seconds)
    median = float(np.median(seconds))
    nfe = imputer(inputs.latents[rows[:2]], present[:2], seed=seed).nfe
    return {"sampler": f"{DEFAULT_SAMPLER}:{DEFAULT_STEPS}", "batch": batch, "nfe": nfe,
            "missing_per_frame_set": 1, "repeats": repeats, "seconds_per_batch": median,
            "frame_sets_per_second": batch / median, "torch_threads": torch.get_num_threads(),
            "device": str(next(inputs.model.score_net.parameters()).device)}


# ---------------------------------------------------------------- the whole run


@dataclass
class EvalResult:
    """The JSON-ready summary (docs/EVAL.md) and the image grids."""

    summary: dict
    grids: list[GridExample]


def build_rows(inputs: EvalInputs, patterns: list[tuple[bool, ...]], runs: list[MethodRun],
               per_method: dict[str, dict[tuple[bool, ...], ViewScores]], real: ViewScores,
               recon: ViewScores, fid_samples: int) -> list[dict]:
    """Summary rows of the references (real, reconstructed) and every method, every group."""
    count = len(inputs.latents)
    real_of, recon_of = {}, {}
    for mask in patterns:
        index = missing_index(mask, count)
        real_of[mask], recon_of[mask] = (subset(real, index, fid_samples),
                                         subset(recon, index, fid_samples))

    def groups(scores_of: dict[tuple[bool, ...], ViewScores]) -> list[Group]:
        return groups_of({pattern_name(m, inputs.cameras): (sum(not p for p in m), scores_of[m],
                                                            real_of[m]) for m in patterns})

    rows = [group_row("real views", "reference", g, compare_to_real=False)
            for g in groups(real_of)]
    rows += [group_row("reconstructed", "reference", g) for g in groups(recon_of)]
    for run in runs:
        rows += [group_row(run.label, run.kind, g) for g in groups(per_method[run.label])]
    return rows


def build_tradeoff(inputs: EvalInputs, judge: Judge, run: MethodRun,
                   scores: dict[tuple[bool, ...], ViewScores], real: ViewScores,
                   recon: ViewScores) -> dict:
    """Bytes per frame set vs quality of all views: latents (k sent) and JPEG/WebP sweeps."""
    count, views = inputs.images.shape[:2]
    per_pattern = {m: (s.correct.reshape(count, -1).astype(float), s.psnr.reshape(count, -1))
                   for m, s in scores.items()}
    latent = latent_tradeoff(per_pattern, recon.correct.reshape(count, views),
                             recon.psnr.reshape(count, views), inputs.latents.shape[-1])
    truth = inputs.images.reshape(-1, *inputs.images.shape[2:])
    labels = np.repeat(inputs.labels, views)

    def judge_views(decoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return judge.classify(decoded)[0] == labels, psnr(decoded, truth)

    codecs = codec_sweep(inputs.images, judge_views)
    return {"method": run.label, "real_coherence": float(real.correct.mean()),
            "latent": latent, "codecs": codecs, "matched": matched_budgets(latent, codecs)}


def run_methods(inputs: EvalInputs, config: EvalConfig, patterns: list[tuple[bool, ...]]
                ) -> list[MethodRun]:
    """Every requested sampler, then every baseline, on every pattern."""
    present = _masks(patterns[0], 2)  # warm-up: the first call pays one-off allocation costs
    Imputer.from_model(inputs.model, steps=2)(inputs.latents[:2], present, seed=config.seed)
    runs = [run_sampler(inputs, spec, patterns, config.seed) for spec in config.samplers]
    runs += [run_baseline(inputs, name, baseline, patterns)
             for name, baseline in fit_baselines(inputs.train_z).items()]
    return runs


def evaluate(config: EvalConfig) -> EvalResult:
    """The full evaluation of docs/EVAL.md; progress goes to the ``logging`` INFO level."""
    inputs = load_inputs(config)
    inception = InceptionFeatures(device=config.device) if config.fid_samples else None
    judge = Judge(inputs.classifier, inputs.classifier_preprocess, inception, config.fid_samples)
    patterns = missing_patterns(len(inputs.cameras))
    real, recon = score_references(inputs, judge)
    runs = run_methods(inputs, config, patterns)
    per_method = {run.label: score_method(inputs, judge, run) for run in runs}
    rows = build_rows(inputs, patterns, runs, per_method, real, recon, config.fid_samples)
    tradeoff = build_tradeoff(inputs, judge, runs[0], per_method[runs[0].label], real, recon)
    throughput = imputation_throughput(inputs, config.throughput_batch, config.seed)
    log.info("throughput: %.1f frame sets/s", throughput["frame_sets_per_second"])
    grids = sample_grids(inputs, config.samplers[0], patterns, config.grid_rows,
                         config.grid_samples, config.seed)
    methods = [{"label": r.label, "kind": r.kind, "nfe": r.nfe, "batch": len(inputs.latents),
                "seconds_per_frame_set": r.seconds_per_frame_set} for r in runs]
    summary = {"schema": SCHEMA, "settings": _settings(config),
               "hardware": hardware(config.device), "data": inputs.split,
               "cameras": inputs.cameras, "patterns": [pattern_name(m, inputs.cameras)
                                                       for m in patterns],
               "methods": methods, "rows": rows, "tradeoff": tradeoff, "throughput": throughput,
               "targets": check_targets(rows, methods, throughput)}
    return EvalResult(summary, grids)


def hardware(device: str) -> dict:
    """Where the numbers were measured: CPU model, cores, torch, threads, device."""
    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": device,
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _settings(config: EvalConfig) -> dict:
    return {"data": config.data, "model": config.model, "classifier": config.classifier,
            "samplers": [s.label for s in config.samplers], "fid_samples": config.fid_samples,
            "frames": config.frames, "val_fraction": config.val_fraction,
            "device": config.device, "seed": config.seed, "quick": config.quick,
            "throughput_batch": config.throughput_batch}
