"""Scores of imputed views -> the rows of ``summary.json`` and the issue's targets.

A row is one (method, group) pair: a group is one missing-view pattern, or a pooling of the
patterns with the same number of missing views, or all patterns. Means are over every
imputed view of the group; the Fréchet distances compare the group's imputed views with the
real views of the same frame sets and cameras. docs/EVAL.md documents every field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mvld.train.metrics_fid import frechet_distance

log = logging.getLogger(__name__)

FAST_MAX_NFE = 20
COHERENCE_POINTS_TARGET = 2.0  # fast sampler within 2 coherence points of the reference
FID_RATIO_TARGET = 1.10  # fast sampler within 10% FID of the reference
PSNR_DB_TARGET = 0.2  # fast sampler within 0.2 dB PSNR of the reference
REAL_FRACTION_TARGET = 0.95  # 1 of 3 missing: imputed coherence >= 95% of real coherence
BASELINE_GROUPS = ("1 missing (pooled)", "2 missing (pooled)")


@dataclass
class ViewScores:
    """Per-image judgements of M views (frame-major order)."""

    correct: np.ndarray | None  # bool [M]: classifier prediction == label (None: no labels)
    features: np.ndarray | None  # [M, F] classifier penultimate features (None: no labels)
    psnr: np.ndarray | None  # [M] dB against the true view (None for the real views)
    ssim: np.ndarray | None  # [M]
    inception: np.ndarray | None  # [min(M, fid_samples), 2048]


@dataclass
class Group:
    """Views pooled into one row: per pattern, the method's scores and the matching real ones."""

    name: str
    missing_views: int | None  # number of missing views, None when patterns are mixed
    parts: list[tuple[ViewScores, ViewScores]]  # (scores, real scores) of each pattern


def _view_count(scores: ViewScores) -> int:
    """Views judged; unlabelled real views carry only Inception features (or nothing)."""
    measured = (scores.correct, scores.psnr, scores.features, scores.inception)
    return next((len(x) for x in measured if x is not None), 0)


def _all_present(values: list[np.ndarray | None]) -> list[np.ndarray] | None:
    """``values`` when none is missing, else None."""
    present = [v for v in values if v is not None]
    return present if len(present) == len(values) else None


def _mean(values: list[np.ndarray | None]) -> float | None:
    present = _all_present(values)
    if present is None:
        return None
    return float(np.concatenate(present).mean())


def _frechet(first: list[np.ndarray | None], second: list[np.ndarray | None]) -> float | None:
    present_first, present_second = _all_present(first), _all_present(second)
    if present_first is None or present_second is None:
        return None
    a, b = np.concatenate(present_first), np.concatenate(present_second)
    if len(a) < 2 or len(b) < 2:
        return None
    return frechet_distance(a, b)


def group_row(method: str, kind: str, group: Group, compare_to_real: bool = True) -> dict:
    """One summary row: coherence, PSNR, SSIM, Fréchet distances, sample counts."""
    scores = [s for s, _ in group.parts]
    real = [r for _, r in group.parts]
    row = {
        "method": method,
        "kind": kind,
        "group": group.name,
        "missing_views": group.missing_views,
        "views": int(sum(_view_count(s) for s in scores)),
        "coherence": _mean(
            [None if s.correct is None else s.correct.astype(float) for s in scores]
        ),
        "psnr": _mean([s.psnr for s in scores]),
        "ssim": _mean([s.ssim for s in scores]),
        "fd_classifier": None,
        "fid": None,
        "fid_views": int(sum(len(s.inception) for s in scores if s.inception is not None)),
    }
    if compare_to_real:
        row["fd_classifier"] = _frechet([s.features for s in scores], [r.features for r in real])
        row["fid"] = _frechet([s.inception for s in scores], [r.inception for r in real])
    return row


def groups_of(per_pattern: dict[str, tuple[int, ViewScores, ViewScores]]) -> list[Group]:
    """Every pattern alone, the pools by number of missing views, and all patterns."""
    groups = [Group(name, missing, [(s, r)]) for name, (missing, s, r) in per_pattern.items()]
    for count in sorted({m for m, _, _ in per_pattern.values()}):
        parts = [(s, r) for m, s, r in per_pattern.values() if m == count]
        groups.append(Group(f"{count} missing (pooled)", count, parts))
    groups.append(
        Group("all patterns (pooled)", None, [(s, r) for _, s, r in per_pattern.values()])
    )
    return groups


def _pooled(rows: list[dict], method: str, group: str = "all patterns (pooled)") -> dict | None:
    return next((r for r in rows if r["method"] == method and r["group"] == group), None)


def _target(name: str, target: str, value: float | None, holds: bool | None, gap: str) -> dict:
    return {"name": name, "target": target, "value": value, "holds": holds, "gap": gap}


def fast_vs_reference(rows: list[dict], methods: list[dict]) -> list[dict]:
    """Fast sampler (first with NFE <= 20) against Euler-Maruyama at the most steps."""
    samplers = [m for m in methods if m["kind"] == "sampler"]
    fast = next((m for m in samplers if 0 < m["nfe"] <= FAST_MAX_NFE), None)
    em = [m for m in samplers if m["label"].startswith("euler_maruyama:")]
    if fast is None or not em:
        return [
            _target(
                "fast_vs_reference",
                "needs a sampler with <= 20 NFE and euler_maruyama",
                None,
                None,
                "not measured",
            )
        ]
    ref = max(em, key=lambda m: m["nfe"])
    f, r = _pooled(rows, fast["label"]), _pooled(rows, ref["label"])
    if f is None or r is None:
        raise ValueError(f"no pooled summary row for {fast['label']!r} or {ref['label']!r}")
    out = []
    if f["coherence"] is not None and r["coherence"] is not None:
        points = 100.0 * (r["coherence"] - f["coherence"])
        out.append(
            _target(
                "fast_coherence_vs_reference",
                f"{fast['label']} within {COHERENCE_POINTS_TARGET} coherence points "
                f"of {ref['label']}",
                points,
                points <= COHERENCE_POINTS_TARGET,
                f"{points:+.2f} points (reference minus fast)",
            )
        )
    gap_db = r["psnr"] - f["psnr"]
    out.append(
        _target(
            "fast_psnr_vs_reference",
            f"{fast['label']} within {PSNR_DB_TARGET} dB PSNR of {ref['label']}",
            gap_db,
            gap_db <= PSNR_DB_TARGET,
            f"{gap_db:+.2f} dB (reference minus fast)",
        )
    )
    if f["fid"] is not None and r["fid"]:
        ratio = f["fid"] / r["fid"]
        out.append(
            _target(
                "fast_fid_vs_reference",
                f"{fast['label']} FID <= {FID_RATIO_TARGET:.2f} x {ref['label']} FID",
                ratio,
                ratio <= FID_RATIO_TARGET,
                f"ratio {ratio:.3f}",
            )
        )
    return out


def beats_baselines(rows: list[dict], methods: list[dict]) -> list[dict]:
    """The first (fast) sampler against every baseline on coherence, PSNR and FID, with 1 and
    with 2 views missing (pooled over the patterns of each count)."""
    samplers = [m for m in methods if m["kind"] == "sampler"]
    if not samplers:
        return []
    out = []
    for group in BASELINE_GROUPS:
        ours = _pooled(rows, samplers[0]["label"], group)
        for base in (m for m in methods if m["kind"] == "baseline"):
            theirs = _pooled(rows, base["label"], group)
            if ours is None or theirs is None:
                continue
            for metric, better in (
                ("coherence", np.greater),
                ("psnr", np.greater),
                ("fid", np.less),
            ):
                if ours[metric] is None or theirs[metric] is None:
                    continue
                holds = bool(better(ours[metric], theirs[metric]))
                missing = group.split(" ", 1)[0]
                out.append(
                    _target(
                        f"beats_{base['label']}_{metric}_{missing}_missing",
                        f"{missing} missing: {samplers[0]['label']} {metric} better "
                        f"than {base['label']}",
                        ours[metric] - theirs[metric],
                        holds,
                        f"{ours[metric]:.4g} vs {theirs[metric]:.4g}",
                    )
                )
    return out


def single_missing_ratio(rows: list[dict], methods: list[dict]) -> list[dict]:
    """With one view missing: imputed coherence over real-view coherence (>= 0.95)."""
    samplers = [m for m in methods if m["kind"] == "sampler"]
    ours = _pooled(rows, samplers[0]["label"], "1 missing (pooled)") if samplers else None
    real = _pooled(rows, "real views", "1 missing (pooled)")
    if ours is None or real is None or not real["coherence"]:
        return []
    ratio = ours["coherence"] / real["coherence"]
    return [
        _target(
            "single_missing_coherence_ratio",
            f"1 missing: {samplers[0]['label']} coherence >= "
            f"{REAL_FRACTION_TARGET:.0%} of real views",
            ratio,
            ratio >= REAL_FRACTION_TARGET,
            f"{ratio:.1%} of real views",
        )
    ]


def check_targets(rows: list[dict], methods: list[dict], throughput: dict | None) -> list[dict]:
    """Every imputation target with its measured value and whether it holds."""
    out = fast_vs_reference(rows, methods) + beats_baselines(rows, methods)
    out += single_missing_ratio(rows, methods)
    if throughput is not None:
        out.append(
            _target(
                "cpu_throughput",
                "reported (frame sets per second)",
                throughput["frame_sets_per_second"],
                None,
                f"batch {throughput['batch']}, {throughput['nfe']} NFE",
            )
        )
    return out
