"""Measure a complete MVLD model on the held-out scenes of a labelled dataset.

What the model card (docs/MODEL.md) reports, all on the held-out tail of the dataset (the
last ``--val-fraction`` of frame sets in stem order: whole scenes when the split falls on a
scene boundary, which this script checks against ``render.json``):

- reconstruction: PSNR and SSIM (``mvld.train.image_quality``, as ``mvld-eval`` computes them)
  of encode -> decode, on uint8 RGB exactly as the receiver hands images to downstream tasks
  (``mvld.receiver.decoder.LatentDecoder``);
- the downstream classifier's accuracy on real views versus reconstructed views;
- coherence with 1 of V views missing: the classifier's accuracy on views imputed with
  ``mvld.receiver.imputation.Imputer``, their PSNR/SSIM against the real view, next to the
  real view (the ceiling), the mean latent and the nearest training frame set in latent
  space given the observed views (the baselines of docs/EVAL.md), and the ridge imputer the
  receiver serves (``--imputer ridge``) when its weights lie beside the model;
- with ``--compare``, other score networks on the same autoencoder imputing the same frame
  sets with the same seeds (an A/B of score networks side by side).

Usage::

    python bench/bench_default_model.py --data runs/sim3x64x12000    # the packaged model
    python bench/bench_default_model.py --data D --model runs/score --classifier C --out R
    python bench/bench_default_model.py --data D --autoencoder runs/ae/last   # stage 1 only
    python bench/bench_default_model.py --data D --compare runs/score_prior/last  # A/B
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mvld.common.dataset import FrameSetFolder
from mvld.common.default_model import DEFAULT_CLASSIFIER, DEFAULT_MODEL
from mvld.common.preprocess import PreprocessConfig, preprocess_images, resize_frame
from mvld.model.autoencoder import Autoencoder
from mvld.model.checkpoint import MVLDModel, load_autoencoder, load_mvld_model
from mvld.model.classifier import ViewClassifier, accuracy, load_classifier
from mvld.receiver.decoder import LatentDecoder
from mvld.receiver.imputation import DEFAULT_SAMPLER, DEFAULT_STEPS, Imputer
from mvld.receiver.ridge_imputer import RidgeImputer, has_ridge
from mvld.train.baselines import NearestNeighbour
from mvld.train.frames import NO_LABEL, evenly_spaced, load_frame_arrays, split_train_val
from mvld.train.image_quality import psnr, ssim
from mvld.train.latents import encode_frame_arrays, load_latent_cache

log = logging.getLogger("bench_default_model")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "default_model.json"


# ---------------------------------------------------------------- image metrics


def image_scores(
    images: np.ndarray,
    reference: np.ndarray | None,
    labels: np.ndarray,
    classifier: ViewClassifier,
    preprocess: PreprocessConfig,
) -> dict[str, float]:
    """Classifier accuracy of uint8 ``images``; PSNR and SSIM against ``reference`` if given."""
    inputs = torch.from_numpy(preprocess_images(images, preprocess))
    scores = {
        "accuracy": accuracy(classifier, inputs, torch.from_numpy(labels)),
        "count": len(images),
    }
    if reference is not None:
        scores |= {
            "psnr_db": float(psnr(images, reference).mean()),
            "ssim": float(ssim(images, reference).mean()),
        }
    return scores


# ---------------------------------------------------------------- the held-out data


@dataclass
class HeldOut:
    """Held-out complete frame sets with their latents, and the training latents."""

    images: np.ndarray  # uint8 [N, V, H, W, 3]
    labels: np.ndarray  # int64 [N]
    latents: torch.Tensor  # [N, V, D] raw encoder latents
    split: dict[str, object]
    train: np.ndarray  # indices of the training frame sets


def _scene_split(data: Path, count: int, val: np.ndarray, stems: list[str]) -> dict[str, object]:
    """Describe the split; whether it falls on a scene (episode) boundary of the render."""
    info: dict[str, object] = {
        "frame_sets": count,
        "held_out_frame_sets": len(val),
        "first_held_out_stem": stems[val[0]],
    }
    render = data / "render.json"
    if render.is_file():
        per_scene = int(json.loads(render.read_text())["rig"]["frames_per_episode"])
        info |= {
            "frames_per_scene": per_scene,
            "held_out_scenes": len(val) / per_scene,
            "split_on_scene_boundary": bool(val[0] % per_scene == 0),
        }
    return info


def _read_frame_sets(
    folder: FrameSetFolder, indices: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 views ``[N, V, H, W, 3]``, presence ``[N, V]`` and labels ``[N]`` of ``indices``."""
    views = len(folder.cameras)
    images = np.zeros((len(indices), views, *size, 3), dtype=np.uint8)
    present = np.zeros((len(indices), views), dtype=bool)
    labels = np.full(len(indices), NO_LABEL, dtype=np.int64)
    for row, index in enumerate(indices):
        frame_set = folder[int(index)]
        for v, image in enumerate(frame_set.views):
            if image is not None:
                images[row, v], present[row, v] = resize_frame(image, *size), True
        labels[row] = NO_LABEL if frame_set.label is None else frame_set.label
    return images, present, labels


def training_latents(
    data: Path, model: MVLDModel, cache: Path | None, count: int, train: np.ndarray
) -> torch.Tensor:
    """Latents of the complete training frame sets: from a score run's cache, else encoded."""
    cached = load_latent_cache(cache, model.fingerprint, str(data), count) if cache else None
    if cached is None:
        log.info("encoding the training split (no usable --latents cache)")
        arrays = load_frame_arrays(data, model.preprocess.height, model.preprocess.width)
        cached = (
            encode_frame_arrays(model.autoencoder, model.preprocess, arrays),
            torch.from_numpy(arrays.present),
        )
    latents, present = cached
    return latents[train[present[train].all(1).numpy()]]


def load_held_out(
    data: Path,
    autoencoder: Autoencoder,
    preprocess: PreprocessConfig,
    val_fraction: float,
    frames: int = 0,
) -> HeldOut:
    """Read and encode the complete labelled held-out frame sets (``frames`` of them, 0: all)."""
    folder = FrameSetFolder(data)
    try:
        count, stems = len(folder), list(folder.stems)
        train, val = split_train_val(count, val_fraction)
        chosen = evenly_spaced(val, frames or len(val))
        images, present, labels = _read_frame_sets(
            folder, chosen, (preprocess.height, preprocess.width)
        )
    finally:
        folder.close()
    keep = present.all(1) & (labels != NO_LABEL)
    images, labels = images[keep], labels[keep]
    flat = torch.from_numpy(preprocess_images(images.reshape(-1, *images.shape[2:]), preprocess))
    with torch.no_grad():  # in chunks: one call over tens of thousands of views needs >20 GB
        latents = torch.cat([autoencoder.encoder(chunk) for chunk in flat.split(512)])
    split = _scene_split(data, count, val, stems) | {"evaluated_frame_sets": len(images)}
    return HeldOut(
        images=images,
        labels=labels,
        latents=latents.reshape(len(images), images.shape[1], -1),
        split=split,
        train=train,
    )


# ---------------------------------------------------------------- imputation baselines


def impute_one_missing(
    held: HeldOut,
    model: MVLDModel,
    train_latents: torch.Tensor,
    sampler: str,
    steps: int,
    seed: int,
    others: dict[str, Imputer | RidgeImputer] | None = None,
    samples: int = 1,
) -> dict[str, dict[str, torch.Tensor]]:
    """For each missing view v: ``{method: latents [N, D] of view v}`` with v dropped.

    ``others`` are further imputers (named) run on the same inputs with the same seeds. With
    ``samples`` K > 1 each diffusion imputer also gives the mean of its K samples
    (``... mean of K``): closer to the truth on average, blurrier."""
    imputer = Imputer.from_model(model, sampler=sampler, steps=steps)
    stats = model.latent_stats
    nearest = NearestNeighbour(stats.standardise(train_latents))  # the mvld-eval baseline
    views = held.latents.shape[1]
    results: dict[str, dict[str, torch.Tensor]] = {}
    for v in range(views):
        present = torch.ones(held.latents.shape[:2], dtype=torch.bool)
        present[:, v] = False
        started = time.perf_counter()
        imputed = imputer(held.latents, present, samples=samples, seed=seed + v)
        log.info(
            "view %d: %d frame sets imputed, %d NFE, %.1f s",
            v,
            len(held.latents),
            imputed.nfe,
            time.perf_counter() - started,
        )
        neighbour = train_latents[nearest.neighbours(stats.standardise(held.latents), present)]
        mean = model.latent_stats.mean[v].expand(len(held.latents), -1)
        results[f"view{v}"] = {
            "diffusion": imputed.latents[:, v],
            "nearest_neighbour": neighbour[:, v],
            "mean_latent": mean,
            "reconstructed": held.latents[:, v],
        }
        if samples > 1:
            results[f"view{v}"][f"diffusion, mean of {samples}"] = imputed.posterior_mean()[:, v]
        for name, other in (others or {}).items():
            k = samples if isinstance(other, Imputer) else 1
            done = other(held.latents, present, samples=k, seed=seed + v)
            results[f"view{v}"][name] = done.latents[:, v]
            if k > 1:
                results[f"view{v}"][f"{name}, mean of {k}"] = done.posterior_mean()[:, v]
    return results


def other_imputers(
    model: MVLDModel, model_path: str | None, compare: list[str], sampler: str, steps: int
) -> dict[str, Imputer | RidgeImputer]:
    """The model's ridge imputer (a file beside it or its score network's regression prior),
    if it has one, and the ``--compare`` score networks."""
    found: dict[str, Imputer | RidgeImputer] = {}
    checkpoint = model_path or str(DEFAULT_MODEL)
    if has_ridge(checkpoint, model):
        found["ridge"] = RidgeImputer.beside(checkpoint, model)
    for path in compare:
        other = load_mvld_model(path)
        if other.fingerprint != model.fingerprint:
            raise SystemExit(f"--compare {path}: trained on another autoencoder than the model")
        found[f"diffusion {path}"] = Imputer.from_model(other, sampler=sampler, steps=steps)
    return found


# ---------------------------------------------------------------- the benchmark


def run(args: argparse.Namespace) -> dict[str, object]:
    """Every measurement of the model card, as one JSON-ready dict."""
    if args.autoencoder:
        autoencoder, preprocess, _ = load_autoencoder(args.autoencoder)
        model = None
    else:
        model = load_mvld_model(args.model)
        autoencoder, preprocess = model.autoencoder, model.preprocess
    classifier, classifier_preprocess = load_classifier(args.classifier)
    decode = LatentDecoder(autoencoder.decoder, preprocess)
    started = time.perf_counter()
    held = load_held_out(args.data, autoencoder, preprocess, args.val_fraction, args.frames)
    views = held.images.shape[1]
    real = held.images.reshape(-1, *held.images.shape[2:])
    labels = np.repeat(held.labels, views)
    recon = decode(held.latents).reshape(real.shape)
    report: dict[str, object] = {
        "model": str(args.autoencoder or args.model or "packaged default"),
        "classifier": str(args.classifier),
        "data": str(args.data),
        "split": held.split,
        "threads": torch.get_num_threads(),
        "all_views": {
            "real": image_scores(real, None, labels, classifier, classifier_preprocess),
            "reconstructed": image_scores(recon, real, labels, classifier, classifier_preprocess),
        },
    }
    if args.imputation and model is not None:
        report["one_missing"] = _one_missing_report(
            held, model, decode, classifier, classifier_preprocess, args
        )
    report["seconds"] = time.perf_counter() - started
    return report


def _one_missing_report(
    held: HeldOut,
    model: MVLDModel,
    decode: LatentDecoder,
    classifier: ViewClassifier,
    preprocess: PreprocessConfig,
    args: argparse.Namespace,
) -> dict[str, object]:
    """Scores of the missing view's image per method, pooled over which view is missing."""
    train_latents = training_latents(
        args.data, model, args.latents, int(held.split["frame_sets"]), held.train
    )
    others = other_imputers(model, args.model, args.compare, args.sampler, args.steps)
    per_view = impute_one_missing(
        held, model, train_latents, args.sampler, args.steps, args.seed, others, args.samples
    )
    methods = next(iter(per_view.values())).keys()
    real = np.concatenate([held.images[:, v] for v in range(len(per_view))])
    labels = np.tile(held.labels, len(per_view))
    scores: dict[str, object] = {
        "sampler": args.sampler,
        "steps": args.steps,
        "samples": args.samples,
        "real": image_scores(real, None, labels, classifier, preprocess),
    }
    stats = model.latent_stats
    for method in methods:
        latents = torch.cat([per_view[f"view{v}"][method] for v in range(len(per_view))])
        scores[method] = image_scores(decode(latents), real, labels, classifier, preprocess)
        # Error in the standardised latent space the model samples in (about 1 for the mean latent).
        errors = [
            (per_view[f"view{v}"][method] - held.latents[:, v]) / stats.std[v]
            for v in range(len(per_view))
        ]
        scores[method]["latent_mse"] = float(torch.cat(errors).pow(2).mean())
    return scores


def format_table(report: dict[str, object]) -> str:
    """A plain-text table of the report."""
    lines = [
        f"{'views':<56}{'PSNR dB':>9}{'SSIM':>8}{'accuracy':>10}{'count':>7}{'latent MSE':>12}"
    ]

    def add(name: str, row: dict[str, float]) -> None:
        psnr = f"{row['psnr_db']:>9.2f}" if "psnr_db" in row else f"{'-':>9}"
        ssim = f"{row['ssim']:>8.3f}" if "ssim" in row else f"{'-':>8}"
        mse = f"{row['latent_mse']:>12.3f}" if "latent_mse" in row else f"{'-':>12}"
        lines.append(f"{name:<56}{psnr}{ssim}{100 * row['accuracy']:>9.1f}%{row['count']:>7d}{mse}")

    for name, row in report["all_views"].items():  # type: ignore[union-attr]
        add(f"all views, {name}", row)
    for name, row in report.get("one_missing", {}).items():  # type: ignore[union-attr]
        if isinstance(row, dict):
            add(f"1 of V missing, {name}", row)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="labelled dataset folder")
    parser.add_argument("--model", default=None, help="mvld checkpoint (default: packaged)")
    parser.add_argument(
        "--autoencoder",
        default=None,
        help="an autoencoder checkpoint (mvld-train ae) instead of a model: "
        "reconstruction and classifier accuracy only",
    )
    parser.add_argument(
        "--classifier",
        default=str(DEFAULT_CLASSIFIER),
        help="classifier checkpoint (default: the packaged one)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="held-out tail, as in training (default 0.1)",
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=1200,
        help="held-out frame sets evaluated, evenly spaced (0: all; default 1200)",
    )
    parser.add_argument(
        "--latents",
        type=Path,
        default=None,
        help="latent cache of the score run (OUT/latents.safetensors): spares "
        "encoding the training split for the nearest-neighbour baseline",
    )
    parser.add_argument(
        "--compare",
        type=lambda text: [p for p in text.split(",") if p],
        default=[],
        metavar="CKPT,...",
        help="further MVLD checkpoints on the same autoencoder, imputed side by side",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=1,
        metavar="K",
        help="samples per frame set; K > 1 also scores the mean of the K (default 1)",
    )
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-imputation",
        dest="imputation",
        action="store_false",
        help="only reconstruction and the classifier",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write the JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(args)
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
