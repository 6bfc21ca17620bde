"""``mvld-eval``'s measurement: imputation quality and cost for every missing-view pattern.

Held-out frame sets (the last ``val_fraction`` of the dataset, the same contiguous tail that
training validates on, i.e. whole held-out scenes) are encoded; for every pattern of missing
views (at least one observed, at least one missing) each method fills the missing latents, the
decoder turns them into images, and each imputed view is judged against the true view:

* coherence: the label classifier (``mvld-train classifier``) on the imputed view agrees with
  the frame-set label, next to the same classifier on the real views (the ceiling) and on the
  reconstructed views (decoder of the true latents: what a perfect imputer could reach). A
  dataset without labels skips coherence and the classifier's Fréchet distance (``None``):
  PSNR, SSIM and FID need no labels;
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
from torch.utils.flop_counter import FlopCounterMode

from mvld.common.default_model import DEFAULT_CLASSIFIER, DEFAULT_MODEL
from mvld.common.errors import ConfigError, DatasetError
from mvld.common.preprocess import PreprocessConfig, preprocess_images
from mvld.hardware import cpu_name
from mvld.model.checkpoint import MVLDModel, checkpoint_paths, load_mvld_model
from mvld.model.classifier import ViewClassifier, load_classifier
from mvld.receiver.decoder import LatentDecoder
from mvld.receiver.imputation import DEFAULT_SAMPLER, DEFAULT_STEPS, Imputer
from mvld.receiver.sampler import sampler_info
from mvld.train.baselines import LatentBaseline, MeanLatent, NearestNeighbour, RidgeRegressor
from mvld.train.eval_summary import Group, ViewScores, check_targets, group_row, groups_of
from mvld.train.frames import NO_LABEL, evenly_spaced, load_frame_arrays, split_train_val
from mvld.train.image_quality import psnr, ssim
from mvld.train.latents import encode_frame_arrays
from mvld.train.metrics_fid import InceptionFeatures, frechet_distance
from mvld.train.tradeoff import (
    LATENT_PRECISIONS,
    codec_sweeps,
    curve_above,
    matched_budgets,
    over_the_wire,
    sent_patterns,
)

log = logging.getLogger(__name__)

DEFAULT_SAMPLERS = "dpmpp_2m_sde:20,dpmpp_2m:20,heun:10,euler_maruyama:1000"
SCHEMA = "mvld-eval/1"


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler at a number of steps, written ``name:steps`` on the command line, or
    ``name:steps:meanK`` for the posterior mean of K samples (the receiver's
    ``--samples K --posterior-mean``)."""

    name: str
    steps: int
    mean_of: int = 1

    @property
    def label(self) -> str:
        """The method name used in tables: ``name:steps`` or ``name:steps:meanK``."""
        tail = f":mean{self.mean_of}" if self.mean_of > 1 else ""
        return f"{self.name}:{self.steps}{tail}"


def parse_samplers(text: str) -> tuple[SamplerSpec, ...]:
    """``"dpmpp_2m:20,heun:10,dpmpp_2m_sde:20:mean8"`` -> specs; unknown names list the
    registered samplers."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, rest = item.partition(":")
        steps, _, mean = rest.partition(":")
        count = mean.removeprefix("mean")
        if not steps.isdigit() or (mean and (not mean.startswith("mean") or not count.isdigit())):
            raise ConfigError(
                f"sampler {item!r}: write name:steps or name:steps:meanK, e.g. dpmpp_2m_sde:20 "
                "or dpmpp_2m_sde:20:mean8"
            )
        if mean and int(count) < 2:
            raise ConfigError(f"sampler {item!r}: a posterior mean needs K >= 2 samples")
        sampler_info(name).check_steps(int(steps))
        specs.append(SamplerSpec(name, int(steps), int(count) if mean else 1))
    if not specs:
        raise ConfigError("--samplers names no sampler")
    if len({s.label for s in specs}) != len(specs):
        raise ConfigError(f"--samplers repeats a sampler: {text}")
    if specs[0].mean_of > 1:
        raise ConfigError(
            "--samplers: the first sampler (the one the trade-off and grids use) must draw one "
            f"sample, not {specs[0].label}"
        )
    return tuple(specs)


@dataclass
class EvalConfig:
    """Everything one evaluation run needs; validated once by the CLI."""

    data: str
    out: str
    model: str | None = None  # None: the packaged default model
    classifier: str | None = None  # None: the packaged default classifier
    samplers: tuple[SamplerSpec, ...] = field(
        default_factory=lambda: parse_samplers(DEFAULT_SAMPLERS)
    )
    fid_samples: int = 100  # imputed views per (method, pattern) for Inception FID; 0: skip
    frames: int = 400  # held-out frame sets evaluated (evenly spaced over the held-out tail)
    val_fraction: float = 0.1
    # dataset the baselines (mean, nearest neighbour, ridge) are fitted on, e.g. the model's
    # training data when --data holds scenes rendered from unseen seeds; None: the training
    # part of --data. With it, every complete frame set of --data is held out.
    fit_data: str | None = None
    fit_frames: int = 10_000  # at most this many complete frame sets of fit_data, evenly spaced
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
    classifier: ViewClassifier | None  # None: the dataset has no labels, coherence is skipped
    classifier_preprocess: PreprocessConfig | None
    cameras: list[str]
    train_z: torch.Tensor  # standardised latents of complete training frame sets [N_train, V, D]
    images: np.ndarray  # uint8 [N, V, H, W, 3] held-out views at the model's size
    labels: np.ndarray  # int64 [N], NO_LABEL everywhere for an unlabelled dataset
    latents: torch.Tensor  # raw latents [N, V, D] of the held-out views
    stems: list[str]
    split: dict


def _resolve(path: str | None, default: Path, what: str) -> Path:
    if path is not None:
        return Path(path)
    if not checkpoint_paths(default)[0].is_file():
        raise ConfigError(
            f"no default {what} is packaged in this installation; name one with --{what}"
        )
    return default


def _select(
    arrays, config: EvalConfig, labelled: bool = True
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Complete training frame sets, evaluated held-out frame sets, and the split's record.

    With ``labelled`` only labelled held-out frame sets are evaluated (coherence needs them).
    """
    train_all, test_all = split_train_val(len(arrays.stems), config.val_fraction)
    if config.fit_data is not None:  # the baselines are fitted elsewhere: all of it is held out
        train_all, test_all = np.arange(0), np.arange(len(arrays.stems))
    complete = arrays.present.all(1)
    train_idx = train_all[complete[train_all]]
    test_idx = test_all[complete[test_all]]
    if labelled:
        test_idx = test_idx[arrays.labels[test_idx] != NO_LABEL]
    if len(test_idx) < 2 or (len(train_idx) < 2 and config.fit_data is None):
        kind = "labelled " if labelled else ""
        raise DatasetError(
            f"{config.data}: fewer than 2 complete {kind}frame sets in the "
            "training or held-out split"
        )
    chosen = evenly_spaced(test_idx, config.frames)
    split = {
        "val_fraction": config.val_fraction,
        "frame_sets": len(arrays.stems),
        "train_complete": len(train_idx),
        "held_out": len(test_all),
        "held_out_complete_labelled": len(test_idx),
        "evaluated": len(chosen),
        "held_out_stems": [arrays.stems[test_all[0]], arrays.stems[test_all[-1]]],
    }
    return train_idx, chosen, split


def load_inputs(config: EvalConfig) -> EvalInputs:
    """Load model, classifier and dataset; encode; select held-out complete frame sets."""
    if not Path(config.data).is_dir():
        raise DatasetError(f"{config.data}: dataset folder does not exist")
    model_path = _resolve(config.model, DEFAULT_MODEL, "model")
    model = load_mvld_model(model_path, device=config.device)
    arrays = load_frame_arrays(config.data, model.preprocess.height, model.preprocess.width)
    if arrays.num_views != model.num_views:
        raise DatasetError(
            f"{config.data} has {arrays.num_views} cameras; the model was "
            f"trained for {model.num_views}"
        )
    labelled = bool((arrays.labels != NO_LABEL).any())
    classifier = classifier_preprocess = classifier_path = None
    if labelled:
        classifier_path = _resolve(config.classifier, DEFAULT_CLASSIFIER, "classifier")
        classifier, classifier_preprocess = load_classifier(classifier_path)
        classifier = classifier.to(config.device)
    else:
        log.warning(
            "%s has no labels: coherence and the classifier's Fréchet distance are "
            "skipped (PSNR, SSIM and FID only)",
            config.data,
        )
    train_idx, chosen, split = _select(arrays, config, labelled)
    log.info(
        "encoding %d frame sets (%d complete training, %d held-out evaluated)",
        len(train_idx) + len(chosen),
        len(train_idx),
        len(chosen),
    )
    latents = encode_frame_arrays(
        model.autoencoder, model.preprocess, arrays, rows=np.concatenate([train_idx, chosen])
    )
    train_latents = latents[train_idx]
    if config.fit_data is not None:
        train_latents, fitted = _fit_latents(config, model)
        split |= {"fit_data": config.fit_data, "train_complete": fitted}
    split |= {
        "model": str(model_path),
        "labelled": labelled,
        "classifier": None if classifier_path is None else str(classifier_path),
    }
    return EvalInputs(
        model=model,
        classifier=classifier,
        classifier_preprocess=classifier_preprocess,
        cameras=arrays.cameras,
        train_z=model.latent_stats.standardise(train_latents),
        images=arrays.images[chosen],
        labels=arrays.labels[chosen],
        latents=latents[chosen],
        stems=[arrays.stems[i] for i in chosen],
        split=split,
    )


def _fit_latents(config: EvalConfig, model: MVLDModel) -> tuple[torch.Tensor, int]:
    """Raw latents of up to ``fit_frames`` complete frame sets of ``fit_data``, and their count."""
    assert config.fit_data is not None
    if not Path(config.fit_data).is_dir():
        raise DatasetError(f"{config.fit_data}: baseline dataset folder does not exist")
    log.info(
        "loading up to %d frame sets of %s for the baselines", config.fit_frames, config.fit_data
    )
    arrays = load_frame_arrays(
        config.fit_data, model.preprocess.height, model.preprocess.width, limit=config.fit_frames
    )
    if arrays.num_views != model.num_views:
        raise DatasetError(
            f"{config.fit_data} has {arrays.num_views} cameras; the model was "
            f"trained for {model.num_views}"
        )
    complete = np.flatnonzero(arrays.present.all(1))
    if len(complete) < 2:
        raise DatasetError(
            f"{config.fit_data}: fewer than 2 complete frame sets to fit the baselines on"
        )
    latents = encode_frame_arrays(model.autoencoder, model.preprocess, arrays, rows=complete)
    return latents[complete], len(complete)


# ---------------------------------------------------------------- judging views


class Judge:
    """Classifier, Inception and the true views: scores any set of views.

    Without a classifier (unlabelled data) ``correct`` and ``features`` stay ``None``.
    """

    def __init__(
        self,
        classifier: ViewClassifier | None,
        preprocess: PreprocessConfig | None,
        inception: InceptionFeatures | None,
        fid_samples: int,
        batch: int = 256,
    ) -> None:
        self.classifier = None if classifier is None else classifier.eval()
        self.preprocess = preprocess
        self.inception, self.fid_samples, self.batch = inception, fid_samples, batch

    @torch.inference_mode()
    def classify(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(predictions [M], penultimate features [M, F])`` of uint8 views."""
        classifier, preprocess = self.classifier, self.preprocess
        if classifier is None or preprocess is None:
            raise ValueError("classifying views needs a classifier and its preprocessing")
        device = next(classifier.parameters()).device
        predictions, features = [], []
        for start in range(0, len(images), self.batch):
            x = torch.from_numpy(
                preprocess_images(images[start : start + self.batch], preprocess)
            ).to(device)
            feats = classifier.features(x)
            predictions.append(classifier.head(feats).argmax(1).cpu().numpy())
            features.append(feats.double().cpu().numpy())
        return np.concatenate(predictions), np.concatenate(features)

    def score(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        truth: np.ndarray | None,
        inception_count: int | None = None,
    ) -> ViewScores:
        """Judge uint8 views ``[M, H, W, 3]`` with their labels and (optionally) true views.

        Inception features are taken for the first ``inception_count`` views (default:
        ``fid_samples``); none without an Inception network.
        """
        correct = features = None
        if self.classifier is not None:
            predictions, features = self.classify(images)
            correct = predictions == labels
        count = self.fid_samples if inception_count is None else inception_count
        inception = None
        if self.inception is not None and count:
            inception = self.inception(images[:count])
        return ViewScores(
            correct=correct,
            features=features,
            psnr=None if truth is None else psnr(images, truth),
            ssim=None if truth is None else ssim(images, truth),
            inception=inception,
        )


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


def run_sampler(
    inputs: EvalInputs, spec: SamplerSpec, patterns: list[tuple[bool, ...]], seed: int
) -> MethodRun:
    """Impute every pattern with one sampler: one batched call over all patterns' rows."""
    imputer = Imputer.from_model(inputs.model, sampler=spec.name, steps=spec.steps)
    count = len(inputs.latents)
    present = torch.cat([_masks(mask, count) for mask in patterns])  # [P * N, V]
    log.info("%s: imputing %d patterns x %d frame sets", spec.label, len(patterns), count)
    latents = inputs.latents.repeat(len(patterns), 1, 1)
    result = imputer(latents, present, samples=spec.mean_of, seed=seed)
    parts = (result.posterior_mean() if spec.mean_of > 1 else result.latents).split(count)
    log.info("%s: %d NFE, %.2f s", spec.label, result.nfe, result.seconds)
    return MethodRun(
        spec.label,
        "sampler",
        dict(zip(patterns, parts, strict=True)),
        result.nfe * spec.mean_of,  # per frame set: K samples, each result.nfe evaluations
        result.seconds / len(present),
    )


def fit_baselines(train_z: torch.Tensor) -> dict[str, LatentBaseline]:
    """The baselines of docs/EVAL.md, fitted on standardised training latents."""
    return {
        "mean_latent": MeanLatent(train_z),
        "nearest_neighbour": NearestNeighbour(train_z),
        "ridge_regressor": RidgeRegressor(train_z),
    }


def run_baseline(
    inputs: EvalInputs, name: str, baseline: LatentBaseline, patterns: list[tuple[bool, ...]]
) -> MethodRun:
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
    recon = LatentDecoder.from_model(inputs.model)(inputs.latents.reshape(count * views, -1))
    limit = min(judge.fid_samples, count) * views
    return (
        judge.score(real, labels, None, inception_count=limit),
        judge.score(recon, labels, real, inception_count=limit),
    )


def subset(scores: ViewScores, index: np.ndarray, fid_samples: int) -> ViewScores:
    """The scores of the views at ``index`` (Inception: the first ``fid_samples`` of them)."""
    inception = None
    if scores.inception is not None and fid_samples:
        head = index[:fid_samples]
        if head.max() >= len(scores.inception):
            raise ValueError("reference Inception features do not cover the subset")
        inception = scores.inception[head]
    return ViewScores(
        correct=None if scores.correct is None else scores.correct[index],
        features=None if scores.features is None else scores.features[index],
        psnr=None if scores.psnr is None else scores.psnr[index],
        ssim=None if scores.ssim is None else scores.ssim[index],
        inception=inception,
    )


def missing_index(mask: tuple[bool, ...], count: int) -> np.ndarray:
    """Frame-major flat indices ``n * V + v`` of the missing views of ``count`` frame sets."""
    missing = np.array([v for v, p in enumerate(mask) if not p])
    return (np.arange(count)[:, None] * len(mask) + missing[None, :]).reshape(-1)


def score_method(
    inputs: EvalInputs, judge: Judge, run: MethodRun
) -> dict[tuple[bool, ...], ViewScores]:
    """Decode and judge the imputed views of every pattern, frame-major ``[N * m]``."""
    flat_truth = inputs.images.reshape(-1, *inputs.images.shape[2:])
    views = inputs.images.shape[1]
    out = {}
    decode = LatentDecoder.from_model(inputs.model)
    for mask, latents in run.latents.items():
        index = missing_index(mask, len(inputs.latents))
        images = decode(latents.reshape(-1, latents.shape[-1])[index])
        out[mask] = judge.score(images, np.repeat(inputs.labels, views)[index], flat_truth[index])
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


def sample_grids(
    inputs: EvalInputs,
    spec: SamplerSpec,
    patterns: list[tuple[bool, ...]],
    rows: int,
    samples: int,
    seed: int,
) -> list[GridExample]:
    """K samples of each pattern's missing views for ``rows`` evenly spaced frame sets."""
    pick = np.unique(np.linspace(0, len(inputs.latents) - 1, rows).round().astype(int))
    imputer = Imputer.from_model(inputs.model, sampler=spec.name, steps=spec.steps)
    out = []
    for mask in patterns:
        result = imputer(inputs.latents[pick], _masks(mask, len(pick)), samples=samples, seed=seed)
        observed = [v for v, p in enumerate(mask) if p]
        missing = [v for v, p in enumerate(mask) if not p]
        drawn = result.samples[:, :, missing]  # [R, K, m, D]
        images = LatentDecoder.from_model(inputs.model)(drawn.reshape(-1, drawn.shape[-1]))
        out.append(
            GridExample(
                pattern=pattern_name(mask, inputs.cameras),
                stems=[inputs.stems[i] for i in pick],
                observed=inputs.images[pick][:, observed],
                truth=inputs.images[pick][:, missing],
                samples=images.reshape(*drawn.shape[:3], *images.shape[1:]),
            )
        )
    return out


def forward_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass (torch's FLOP counter: 2 per multiply-add)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    """This CPU's float32 matmul throughput at the current thread count: the practical limit
    that the imputation and decoding figures are compared with."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def imputation_throughput(inputs: EvalInputs, batch: int, seed: int, repeats: int = 3) -> dict:
    """Frame sets per second of the default sampler with one view of each frame set missing,
    with and without decoding every view, and the fraction of the matmul limit reached."""
    views = inputs.latents.shape[1]
    rows = torch.arange(batch) % len(inputs.latents)
    present = torch.ones(batch, views, dtype=torch.bool)
    present[torch.arange(batch), torch.arange(batch) % views] = False
    imputer = Imputer.from_model(inputs.model, sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS)
    decode = LatentDecoder.from_model(inputs.model)
    imputed = imputer(inputs.latents[rows], present, seed=seed)  # warm-up
    decode(imputed.latents)
    impute_s, decode_s = [], []
    for repeat in range(repeats):
        imputed = imputer(inputs.latents[rows], present, seed=seed + repeat)
        start = time.perf_counter()
        decode(imputed.latents)
        impute_s.append(imputed.seconds)
        decode_s.append(time.perf_counter() - start)
    impute, decoding = float(np.median(impute_s)), float(np.median(decode_s))
    z = inputs.latents[rows[:2]].to(next(inputs.model.score_net.parameters()).device)
    tau = torch.zeros(2, views, device=z.device)  # 2 samples: GroupNorm needs more than 1 value
    score_flops = forward_flops(inputs.model.score_net, z, tau) // 2
    decoder_flops = views * forward_flops(inputs.model.autoencoder.decoder, z[:, 0]) // 2
    work = batch * (imputed.nfe * score_flops + decoder_flops)
    peak = matmul_gflops()
    return {
        "sampler": f"{DEFAULT_SAMPLER}:{DEFAULT_STEPS}",
        "batch": batch,
        "nfe": imputed.nfe,
        "missing_per_frame_set": 1,
        "repeats": repeats,
        "seconds_per_batch": impute,
        "decode_seconds_per_batch": decoding,
        "frame_sets_per_second": batch / (impute + decoding),
        "frame_sets_per_second_without_decoding": batch / impute,
        "score_mflop_per_evaluation": score_flops / 1e6,
        "decoder_mflop_per_frame_set": decoder_flops / 1e6,
        "achieved_gflops": work / (impute + decoding) / 1e9,
        "matmul_gflops_float32": peak,
        "fraction_of_matmul_limit": work / (impute + decoding) / 1e9 / peak,
        "torch_threads": torch.get_num_threads(),
        "device": str(z.device),
    }


# ---------------------------------------------------------------- the whole run


@dataclass
class EvalResult:
    """The JSON-ready summary (docs/EVAL.md) and the image grids."""

    summary: dict
    grids: list[GridExample]


def build_rows(
    inputs: EvalInputs,
    patterns: list[tuple[bool, ...]],
    runs: list[MethodRun],
    per_method: dict[str, dict[tuple[bool, ...], ViewScores]],
    real: ViewScores,
    recon: ViewScores,
    fid_samples: int,
) -> list[dict]:
    """Summary rows of the references (real, reconstructed) and every method, every group."""
    count = len(inputs.latents)
    real_of, recon_of = {}, {}
    for mask in patterns:
        index = missing_index(mask, count)
        real_of[mask], recon_of[mask] = (
            subset(real, index, fid_samples),
            subset(recon, index, fid_samples),
        )

    def groups(scores_of: dict[tuple[bool, ...], ViewScores]) -> list[Group]:
        return groups_of(
            {
                pattern_name(m, inputs.cameras): (sum(not p for p in m), scores_of[m], real_of[m])
                for m in patterns
            }
        )

    rows = [group_row("real views", "reference", g, compare_to_real=False) for g in groups(real_of)]
    rows += [group_row("reconstructed", "reference", g) for g in groups(recon_of)]
    for run in runs:
        rows += [group_row(run.label, run.kind, g) for g in groups(per_method[run.label])]
    return rows


def _tradeoff_quality(inputs: EvalInputs, judge: Judge, real: ViewScores):
    """The quality of decoded views ``[P, N, V, H, W, 3]`` (P repeats of the held-out set)."""
    count, views = inputs.images.shape[:2]
    fid_frames = min(judge.fid_samples, count)

    def quality(decoded: np.ndarray, with_fid: bool) -> dict:
        decoded = decoded.reshape(-1, *inputs.images.shape)
        repeats = len(decoded)
        flat = decoded.reshape(-1, *inputs.images.shape[2:])
        truth = np.broadcast_to(inputs.images, decoded.shape).reshape(flat.shape).copy()
        labels = np.tile(np.repeat(inputs.labels, views), repeats)
        scores = judge.score(flat, labels, truth, inception_count=0)
        fid = None
        if with_fid and judge.inception is not None and fid_frames and real.inception is not None:
            frames = np.arange(fid_frames)  # frame set n from pattern n mod P: each set once
            picks = decoded[frames % repeats, frames].reshape(-1, *inputs.images.shape[2:])
            fid = frechet_distance(judge.inception(picks), real.inception[: fid_frames * views])
        if scores.psnr is None or scores.ssim is None:
            raise RuntimeError("views judged against their true views must have PSNR and SSIM")
        coherence = None if scores.correct is None else float(scores.correct.mean())
        return {
            "psnr": float(scores.psnr.mean()),
            "ssim": float(scores.ssim.mean()),
            "coherence": coherence,
            "fid": fid,
        }

    return quality


def latent_points(inputs: EvalInputs, spec: SamplerSpec, seed: int, quality) -> list[dict]:
    """MVLD with k = 1..V views sent in every latent precision: real message bytes, quality."""
    imputer = Imputer.from_model(inputs.model, sampler=spec.name, steps=spec.steps)
    decode = LatentDecoder.from_model(inputs.model)
    count, views = inputs.images.shape[:2]
    shape = inputs.model.autoencoder.config.latent_shape
    raw = inputs.latents.numpy()
    points = []
    for dtype in LATENT_PRECISIONS:
        for sent in range(1, views + 1):
            decoded, sizes = [], []
            for mask in sent_patterns(views, sent):
                received, nbytes = over_the_wire(
                    raw, np.array(mask), shape, dtype, inputs.model.fingerprint
                )
                latents = torch.from_numpy(received)
                if sent < views:
                    latents = imputer(latents, _masks(mask, count), seed=seed).latents
                decoded.append(decode(latents))
                sizes.append(float(nbytes.mean()))
            points.append(
                {
                    "dtype": dtype,
                    "views_sent": sent,
                    "patterns": len(decoded),
                    "bytes": float(np.mean(sizes)),
                    **quality(np.stack(decoded), True),
                }
            )
            log.info(
                "tradeoff: %s, %d of %d views sent: %.0f B, %.2f dB",
                dtype,
                sent,
                views,
                points[-1]["bytes"],
                points[-1]["psnr"],
            )
    return points


def build_tradeoff(
    inputs: EvalInputs, judge: Judge, spec: SamplerSpec, real: ViewScores, seed: int
) -> dict:
    """Bytes per frame set vs quality of all views: MVLD (k sent, each precision) and codecs."""
    quality = _tradeoff_quality(inputs, judge, real)
    latent = latent_points(inputs, spec, seed, quality)
    codecs = codec_sweeps(inputs.images, quality)
    matched = matched_budgets(latent, codecs, inputs.images, quality)
    real_coherence = None if real.correct is None else float(real.correct.mean())
    return {
        "method": spec.label,
        "real_coherence": real_coherence,
        "latent": latent,
        "codecs": codecs,
        "matched": matched,
        "curve_above": [
            curve_above(matched, "psnr"),
            curve_above(matched, "ssim"),
            curve_above(matched, "fid", higher_is_better=False),
        ],
    }


def run_methods(
    inputs: EvalInputs, config: EvalConfig, patterns: list[tuple[bool, ...]]
) -> list[MethodRun]:
    """Every requested sampler, then every baseline, on every pattern."""
    present = _masks(patterns[0], 2)  # warm-up: the first call pays one-off allocation costs
    Imputer.from_model(inputs.model, steps=2)(inputs.latents[:2], present, seed=config.seed)
    runs = [run_sampler(inputs, spec, patterns, config.seed) for spec in config.samplers]
    runs += [
        run_baseline(inputs, name, baseline, patterns)
        for name, baseline in fit_baselines(inputs.train_z).items()
    ]
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
    tradeoff = build_tradeoff(inputs, judge, config.samplers[0], real, config.seed)
    throughput = imputation_throughput(inputs, config.throughput_batch, config.seed)
    log.info("throughput: %.1f frame sets/s", throughput["frame_sets_per_second"])
    grids = sample_grids(
        inputs, config.samplers[0], patterns, config.grid_rows, config.grid_samples, config.seed
    )
    methods = [
        {
            "label": r.label,
            "kind": r.kind,
            "nfe": r.nfe,
            "batch": len(inputs.latents),
            "seconds_per_frame_set": r.seconds_per_frame_set,
        }
        for r in runs
    ]
    summary = {
        "schema": SCHEMA,
        "settings": _settings(config),
        "hardware": hardware(config.device),
        "data": inputs.split,
        "cameras": inputs.cameras,
        "patterns": [pattern_name(m, inputs.cameras) for m in patterns],
        "methods": methods,
        "rows": rows,
        "tradeoff": tradeoff,
        "throughput": throughput,
        "targets": check_targets(rows, methods, throughput),
    }
    return EvalResult(summary, grids)


def hardware(device: str) -> dict:
    """Where the numbers were measured: CPU model, cores, torch, threads, device."""
    info = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _settings(config: EvalConfig) -> dict:
    return {
        "data": config.data,
        "model": config.model,
        "classifier": config.classifier,
        "samplers": [s.label for s in config.samplers],
        "fid_samples": config.fid_samples,
        "frames": config.frames,
        "val_fraction": config.val_fraction,
        "device": config.device,
        "seed": config.seed,
        "quick": config.quick,
        "throughput_batch": config.throughput_batch,
    }
