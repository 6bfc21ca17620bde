"""Camera outages on held-out video: imputation with each camera's memory against without.

For every scene of a sequence dataset (docs/DATASETS.md, Sequences) and a few outage starts
per scene, one or two cameras fail at frame ``r0`` and stay failed. At the end of an outage of
``d`` seconds the failed views are imputed the way the receiver would: the video-aware model
with the failed cameras' last good latents (frame ``r0 - 1``) and the observed cameras' latents
of the frame before as memories, the same model without memories, the memoryless reference
model (by default the packaged one) and *hold last* (the memory decoded as it is), all at the
same sampler and steps. Scores per outage length: PSNR, SSIM and coherence of the imputed
views (with the reconstructed views' as the ceiling), FID against the true views, and flicker:
the mean absolute change between consecutive imputed frames over the last ``window`` frames
of the outage, divided by the true views' change over the same frames (1 = as steady as the
video; independent samples flicker far above it). Every method draws one noise per outage, as
the receiver draws one per node; ``memory, new noise every frame`` shows what that buys.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from mvld.common.dataset import FrameSetFolder, encode_png, read_scenes
from mvld.common.default_model import DEFAULT_CLASSIFIER, DEFAULT_MODEL
from mvld.common.errors import ConfigError, DatasetError
from mvld.common.preprocess import preprocess_images, resize_frame
from mvld.model.checkpoint import MVLDModel, load_mvld_model
from mvld.model.classifier import load_classifier
from mvld.receiver.decoder import LatentDecoder
from mvld.receiver.imputation import Imputer
from mvld.receiver.ridge_imputer import RidgeImputer, has_ridge
from mvld.train.evaluation import Judge, SamplerSpec
from mvld.train.metrics_fid import InceptionFeatures, frechet_distance

__all__ = ["OutageConfig", "evaluate_outages", "outage_table"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutageConfig:
    """One outage evaluation."""

    data: str
    model: str  # the video-aware model
    reference: str | None = None  # memoryless model compared with; None: the packaged one
    classifier: str | None = None  # None: the packaged classifier (unused without labels)
    outages_s: tuple[float, ...] = (1.0, 5.0, 30.0)
    starts_per_scene: int = 2  # outage starts per scene, 1 s apart from 1 s into the scene
    window: int = 4  # last frames of each outage imputed in a row (flicker)
    sampler: SamplerSpec = field(default_factory=lambda: SamplerSpec("dpmpp_2m_sde", 20))
    fid_samples: int = 100
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.outages_s or min(self.outages_s) <= 0:
            raise ConfigError("--outages needs positive durations in seconds")
        if self.window < 2 or self.starts_per_scene < 1:
            raise ConfigError("need a window of >= 2 frames and >= 1 start per scene")


@dataclass(frozen=True)
class Case:
    """One camera outage: failed cameras from row ``start`` on, scored at ``rows``."""

    start: int
    failed: tuple[int, ...]
    rows: tuple[int, ...]  # consecutive rows, the last at the outage's full length


def plan_cases(
    scene: np.ndarray, fps: float, outage_s: float, views: int, starts: int, window: int
) -> list[Case]:
    """Every (scene, start, failed cameras) whose outage of ``outage_s`` fits in its scene."""
    length = max(window, round(outage_s * fps))
    patterns = [c for k in (1, 2) if k < views for c in combinations(range(views), k)]
    cases = []
    for s in np.unique(scene):
        rows = np.nonzero(scene == s)[0]
        first, last = int(rows[0]), int(rows[-1])
        for k in range(starts):
            start = first + round(fps) * (k + 1)  # 1 s into the scene, then 1 s apart
            end = start + length - 1
            if end > last:
                continue
            window_rows = tuple(range(end - window + 1, end + 1))
            cases += [Case(start, failed, window_rows) for failed in patterns]
    return cases


class _FrameCache:
    """Decoded, encoded rows of the dataset, loaded on first use."""

    def __init__(self, folder: FrameSetFolder, model: MVLDModel) -> None:
        self.folder, self.model = folder, model
        self.images: dict[int, np.ndarray] = {}
        self.latents: dict[int, torch.Tensor] = {}

    def load(self, rows: set[int]) -> None:
        todo = sorted(rows - self.images.keys())
        height, width = self.model.preprocess.height, self.model.preprocess.width
        for start in range(0, len(todo), 128):
            chunk = todo[start : start + 128]
            views = []
            for row in chunk:
                frame_set = self.folder[row]
                complete = [view for view in frame_set.views if view is not None]
                if len(complete) != len(frame_set.views):
                    raise DatasetError(
                        f"frame set {self.folder.stems[row]} misses a view: "
                        f"outages are played on complete frame sets"
                    )
                views.append(np.stack([resize_frame(v, height, width) for v in complete]))
            stacked = np.stack(views)  # [n, V, H, W, 3]
            x = torch.from_numpy(
                preprocess_images(stacked.reshape(-1, *stacked.shape[2:]), self.model.preprocess)
            )
            with torch.inference_mode():
                z = (
                    self.model.autoencoder.encoder(x)
                    .float()
                    .reshape(len(chunk), stacked.shape[1], -1)
                )
            for i, row in enumerate(chunk):
                self.images[row], self.latents[row] = stacked[i], z[i]
            log.info("outages: encoded %d of %d frame sets", start + len(chunk), len(todo))


def _inputs(
    cases: list[Case], cache: _FrameCache, fps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Stacked ``latents, present, memory, memory_age`` over every case's rows, the rows and
    their sampler seeds (one per case, as the receiver seeds one per node)."""
    latents, present, memory, age, rows, seeds = [], [], [], [], [], []
    for number, case in enumerate(cases):
        for row in case.rows:
            failed = torch.zeros(cache.latents[row].shape[0], dtype=torch.bool)
            failed[list(case.failed)] = True
            latents.append(cache.latents[row])
            present.append(~failed)
            memory.append(
                torch.where(failed[:, None], cache.latents[case.start - 1], cache.latents[row - 1])
            )
            age.append(torch.where(failed, (row - case.start + 1) / fps, 1 / fps))
            rows.append(row)
            seeds.append(number)
    return (
        torch.stack(latents),
        torch.stack(present),
        torch.stack(memory),
        torch.stack(age).float(),
        rows,
        seeds,
    )


def evaluate_outages(config: OutageConfig) -> tuple[dict, dict[float, np.ndarray]]:
    """Run every method on every outage length: a JSON-ready summary, and per outage a strip
    of consecutive frames of one failed camera (rows: ``summary["strip_rows"]``)."""
    model = load_mvld_model(config.model, device=config.device)
    if not getattr(model.score_net.config, "memory", False):
        raise ConfigError(
            f"{config.model}: not a video-aware model (train with `mvld-train score --memory`)"
        )
    reference = load_mvld_model(config.reference or DEFAULT_MODEL, device=config.device)
    if reference.fingerprint != model.fingerprint:
        raise ConfigError("the reference model uses another encoder: latents would differ")
    folder = FrameSetFolder(config.data)
    scenes = read_scenes(config.data, folder.stems)
    if scenes is None:
        raise DatasetError(f"{config.data}: not a sequence dataset (docs/DATASETS.md)")
    views = len(folder.cameras)
    labels = (
        None
        if folder.labels is None
        else np.array([folder.labels.get(stem, -1) for stem in folder.stems])
    )
    judge = _judge(config, labels is not None)
    decode = LatentDecoder.from_model(model)
    cache = _FrameCache(folder, model)
    spec = config.sampler
    diffusion = Imputer.from_model(model, sampler=spec.name, steps=spec.steps)
    imputers: dict[str, tuple[Imputer | RidgeImputer, bool]] = {  # name: (imputer, memories)
        "memory": (diffusion, True),
        "same model, no memory": (diffusion, False),
        "reference (memoryless)": (
            Imputer.from_model(reference, sampler=spec.name, steps=spec.steps),
            False,
        ),
    }
    if has_ridge(config.model, model):  # the deterministic imputer, with and without memory
        ridge = RidgeImputer.beside(config.model, model)
        if ridge.uses_memory:
            imputers["ridge + memory prior"] = (ridge, True)
        imputers["ridge (memoryless)"] = (ridge, False)
    summary: dict = {
        "data": config.data,
        "model": config.model,
        "reference": str(config.reference or DEFAULT_MODEL),
        "sampler": f"{spec.name}:{spec.steps}",
        "fps": scenes.fps,
        "window": config.window,
        "outages": [],
        "strip_rows": [
            "true",
            "reconstructed",
            "hold last",
            *imputers,
            "memory, new noise every frame",
        ],
    }
    strips: dict[float, np.ndarray] = {}
    for outage in config.outages_s:
        cases = plan_cases(
            scenes.scene, scenes.fps, outage, views, config.starts_per_scene, config.window
        )
        if not cases:
            log.warning("no scene is long enough for a %.3g s outage; skipped", outage)
            continue
        needed = (
            {r for c in cases for r in c.rows}
            | {r - 1 for c in cases for r in c.rows}
            | {c.start - 1 for c in cases}
        )
        cache.load(needed)
        latents, present, memory, age, rows, seeds = _inputs(cases, cache, scenes.fps)
        missing = ~present
        truth = np.stack([cache.images[r] for r in rows])[missing.numpy()]
        view_labels = (
            None if labels is None else np.repeat(labels[rows], views)[missing.numpy().reshape(-1)]
        )
        results = {}
        outputs = {
            "reconstructed": latents,
            "hold last": torch.where(missing[..., None], memory, latents),
        }
        seeded = [config.seed * 1_000_003 + s for s in seeds]
        for name, (imputer, remembers) in imputers.items():
            outputs[name] = imputer(
                latents,
                present,
                seed=seeded,
                memory=memory if remembers else None,
                memory_age=age if remembers else None,
            ).latents
        fresh = list(range(len(rows)))  # every frame its own noise: what seeding by node avoids
        outputs["memory, new noise every frame"] = diffusion(
            latents, present, seed=fresh, memory=memory, memory_age=age
        ).latents
        first = int(missing[0].sum())  # failed cameras of the first case
        strip = [truth[: config.window * first : first]]  # its first failed camera, in a row
        for name, z in outputs.items():
            images = decode(z[missing])
            strip.append(images[: config.window * first : first])
            results[name] = _score(
                judge, images, truth, view_labels, config.window, len(cases), missing
            )
            log.info("outage %.3g s, %s: %s", outage, name, results[name])
        strips[outage] = np.concatenate([np.concatenate(list(row), axis=1) for row in strip])
        summary["outages"].append(
            {
                "seconds": outage,
                "cases": len(cases),
                "imputed_views": int(missing.sum()),
                "methods": results,
            }
        )
    return summary, strips


def _judge(config: OutageConfig, labelled: bool) -> Judge:
    classifier = preprocess = None
    if labelled:
        classifier, preprocess = load_classifier(config.classifier or DEFAULT_CLASSIFIER)
        classifier = classifier.to(config.device)
    inception = InceptionFeatures(device=config.device) if config.fid_samples else None
    return Judge(classifier, preprocess, inception, config.fid_samples)


def _score(
    judge: Judge,
    images: np.ndarray,
    truth: np.ndarray,
    labels: np.ndarray | None,
    window: int,
    cases: int,
    missing: torch.Tensor,
) -> dict:
    """PSNR, SSIM, coherence, FID and flicker of the imputed views of one method."""
    scores = judge.score(images, labels if labels is not None else np.zeros(len(images)), truth)
    if scores.psnr is None or scores.ssim is None:
        raise RuntimeError("views judged against their true views must have PSNR and SSIM")
    if labels is not None and scores.correct is None:
        raise RuntimeError("labelled views must be judged with a classifier")
    coherence = None if labels is None or scores.correct is None else float(np.mean(scores.correct))
    result = {
        "psnr": float(np.mean(scores.psnr)),
        "ssim": float(np.mean(scores.ssim)),
        "coherence": coherence,
    }
    if judge.inception is not None and scores.inception is not None and len(images) >= 2:
        count = min(judge.fid_samples, len(images))
        real = judge.inception(truth[:count])
        result["fid"] = frechet_distance(scores.inception[:count], real)
    per_case = missing.reshape(cases, window, -1)[:, 0].sum(1).numpy()  # failed cameras
    result["flicker"] = _flicker(images, truth, per_case, window)
    return result


def _flicker(images: np.ndarray, truth: np.ndarray, per_case: np.ndarray, window: int) -> float:
    """Consecutive-frame change of the imputed views over the true views' change.

    ``images`` and ``truth`` hold, case after case, ``window`` frames of its failed cameras
    (frame-major), as ``Tensor[missing]`` orders them.
    """
    imputed_change, true_change, at = [], [], 0
    for failed in per_case.tolist():
        block = slice(at, at + window * failed)  # rows frame-major: [window, failed]
        seq = images[block].reshape(window, failed, *images.shape[1:]).astype(np.float32)
        real = truth[block].reshape(window, failed, *truth.shape[1:]).astype(np.float32)
        imputed_change.append(np.abs(np.diff(seq, axis=0)).mean())
        true_change.append(np.abs(np.diff(real, axis=0)).mean())
        at += window * failed
    return float(np.mean(imputed_change) / max(np.mean(true_change), 1e-6))


def outage_table(summary: dict) -> str:
    """The summary as a markdown table."""
    lines = [
        "| outage | method | PSNR dB | SSIM | coherence | FID | flicker |",
        "|---|---|---|---|---|---|---|",
    ]
    for outage in summary["outages"]:
        for name, r in outage["methods"].items():
            coherence = "n/a" if r["coherence"] is None else f"{r['coherence']:.3f}"
            fid = f"{r['fid']:.1f}" if "fid" in r else "n/a"
            lines.append(
                f"| {outage['seconds']:g} s | {name} | {r['psnr']:.2f} | "
                f"{r['ssim']:.3f} | {coherence} | {fid} | {r['flicker']:.2f} |"
            )
    return "\n".join(lines)


def write_outage_outputs(summary: dict, strips: dict[float, np.ndarray], out: str | Path) -> Path:
    """``summary.json``, ``summary.md`` and ``strip_<S>s.png`` per outage into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for seconds, strip in strips.items():
        encode_png(out / f"strip_{seconds:g}s.png", strip)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(outage_table(summary) + "\n")
    return out / "summary.json"
