"""The verdict of ``mvld-train all``: does the diffusion imputer beat the simple baselines?

Pure functions over the rows of an evaluation (:func:`mvld.train.eval_summary.group_row`) and
the validation histories of the training stages, so that the judgement can be tested without
training anything. The imputer *wins* only if, for every number of missing views, it is at
least as good as every baseline on PSNR and, when the dataset has labels, on coherence; a
model that loses anywhere is never reported as fine. A loss comes with one plain sentence on
its likely cause and what to do about it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SCHEMA = "mvld-verdict/1"
BASELINES = ("mean_latent", "nearest_neighbour", "ridge_regressor")
METRICS = ("psnr", "coherence")  # higher is better for both
RECONSTRUCTION_LOW_DB = 24.0  # below this the decoder blurs away what the views share
STILL_IMPROVING_DB = 0.2  # autoencoder: last validation PSNR gain that means "keep training"
STILL_FALLING = 0.01  # score network: last relative drop of the validation loss
FEW_FRAME_SETS = 2000  # complete training frame sets below which data is the likely limit


@dataclass
class TrainingEvidence:
    """What training left behind that explains a result."""

    reconstruction_psnr: float | None  # dB, held-out views through the autoencoder
    reconstruction_ssim: float | None
    ae_val_psnr: list[float] = field(default_factory=list)  # validation PSNR, in step order
    score_val_loss: list[float] = field(default_factory=list)  # conditional validation loss
    train_frame_sets: int = 0  # complete frame sets the score network trained on
    labelled: bool = False


@dataclass
class Loss:
    """One comparison the imputer lost: ``ours < theirs`` on ``metric``."""

    missing: int
    baseline: str
    metric: str
    ours: float
    theirs: float


def _pooled(rows: list[dict], method: str, missing: int) -> dict | None:
    group = f"{missing} missing (pooled)"
    return next((r for r in rows if r["method"] == method and r["group"] == group), None)


def missing_counts(rows: list[dict]) -> list[int]:
    """Numbers of missing views the rows cover, ascending."""
    return sorted({r["missing_views"] for r in rows if r.get("missing_views") is not None})


def imputation_table(rows: list[dict], imputer: str) -> list[dict]:
    """Per missing count, the imputer and each baseline: PSNR, SSIM, coherence (or None)."""
    table = []
    for missing in missing_counts(rows):
        for method in (imputer, *BASELINES):
            row = _pooled(rows, method, missing)
            if row is not None:
                table.append(
                    {
                        "missing": missing,
                        "method": method,
                        "psnr": row["psnr"],
                        "ssim": row["ssim"],
                        "coherence": row["coherence"],
                    }
                )
    return table


def losses(table: list[dict], imputer: str) -> list[Loss]:
    """Every (missing count, baseline, metric) where a baseline beats the imputer."""
    ours = {r["missing"]: r for r in table if r["method"] == imputer}
    found = []
    for row in (r for r in table if r["method"] != imputer):
        mine = ours.get(row["missing"])
        for metric in METRICS:
            if mine is None or mine[metric] is None or row[metric] is None:
                continue
            if mine[metric] < row[metric]:
                found.append(Loss(row["missing"], row["method"], metric, mine[metric], row[metric]))
    return found


def _comparisons(table: list[dict], imputer: str) -> int:
    """How many (count, baseline, metric) comparisons ``losses`` makes."""
    ours = {r["missing"]: r for r in table if r["method"] == imputer}
    return sum(
        1
        for r in table
        if r["method"] != imputer and r["missing"] in ours
        for m in METRICS
        if r[m] is not None and ours[r["missing"]][m] is not None
    )


def best_psnr(table: list[dict]) -> dict[str, str]:
    """Per missing count (as a string, a JSON key), the method with the highest PSNR."""
    best: dict[str, dict] = {}
    for row in table:
        key = str(row["missing"])
        if row["psnr"] is not None and (key not in best or row["psnr"] > best[key]["psnr"]):
            best[key] = row
    return {k: r["method"] for k, r in best.items()}


def still_improving(
    history: list[float], min_gain: float, relative: bool = False, lower_is_better: bool = False
) -> bool:
    """Whether the last validation still moved the right way by more than ``min_gain``."""
    values = [v for v in history if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return False
    gain = values[-2] - values[-1] if lower_is_better else values[-1] - values[-2]
    if relative:
        gain /= max(abs(values[-2]), 1e-12)
    return gain > min_gain


def likely_cause(evidence: TrainingEvidence) -> tuple[str, str]:
    """``(cause, what to do)`` of a lost comparison, the most upstream cause first."""
    recon = evidence.reconstruction_psnr
    if recon is not None and recon < RECONSTRUCTION_LOW_DB:
        return (
            f"the autoencoder is under-trained (held-out reconstruction {recon:.1f} dB, "
            f"below {RECONSTRUCTION_LOW_DB:.0f} dB)",
            "train the autoencoder longer: a larger --budget or more [ae] steps",
        )
    if still_improving(evidence.ae_val_psnr, STILL_IMPROVING_DB):
        return (
            "the autoencoder is under-trained (its validation PSNR was still rising)",
            "train the autoencoder longer: a larger --budget or more [ae] steps",
        )
    if still_improving(evidence.score_val_loss, STILL_FALLING, relative=True, lower_is_better=True):
        return (
            "the score network is under-trained (its validation loss was still falling)",
            "train the score network longer: a larger --budget or more [score] steps",
        )
    if evidence.train_frame_sets < FEW_FRAME_SETS:
        return (
            f"there is too little data ({evidence.train_frame_sets} complete training "
            f"frame sets; a few thousand are needed)",
            "record more frame sets and train again",
        )
    return (
        "training has converged without an edge over the baselines on this data",
        "try a larger model or budget; until then a deterministic imputer predicts the "
        "missing views better",
    )


def build_verdict(rows: list[dict], imputer: str, evidence: TrainingEvidence) -> dict:
    """The JSON-ready verdict: reconstruction, imputation table, losses, one sentence."""
    table = imputation_table(rows, imputer)
    lost = losses(table, imputer)
    measured = any(r["method"] == imputer for r in table)
    wins = measured and not lost
    if not measured:
        sentence = "The imputer was not evaluated: no held-out frame set with a missing view."
        cause = advice = None
    elif wins:
        what = "PSNR and coherence" if evidence.labelled else "PSNR"
        sentence = (
            f"The diffusion imputer ({imputer}) beats every baseline on {what} for "
            "every number of missing views."
        )
        cause = advice = None
    else:
        cause, advice = likely_cause(evidence)
        worst = max(lost, key=lambda x: (x.metric == "psnr", x.theirs - x.ours))
        shown = (
            f"PSNR {worst.ours:.2f} vs {worst.theirs:.2f} dB"
            if worst.metric == "psnr"
            else f"{worst.metric} {worst.ours:.3f} vs {worst.theirs:.3f}"
        )
        sentence = (
            f"The diffusion imputer loses to {worst.baseline} with {worst.missing} "
            f"missing ({shown}; {len(lost)} of {_comparisons(table, imputer)} "
            f"comparisons lost): likely {cause}; {advice}."
        )
    return {
        "schema": SCHEMA,
        "imputer": imputer,
        "imputer_wins": wins,
        "coherence_measured": evidence.labelled,
        "reconstruction": {
            "psnr": evidence.reconstruction_psnr,
            "ssim": evidence.reconstruction_ssim,
        },
        "imputation": table,
        "best_psnr": best_psnr(table),
        "losses": [asdict(x) for x in lost],
        "cause": cause,
        "advice": advice,
        "sentence": sentence,
        "evidence": asdict(evidence),
    }


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report_markdown(verdict: dict) -> str:
    """``report.md``: the reconstruction line, the imputation table and the sentence.

    The same text is printed in the terminal; a markdown table reads well in both.
    """
    recon = verdict["reconstruction"]
    lines = [
        "# Training verdict",
        "",
        f"Held-out reconstruction: PSNR {_cell(recon['psnr'], 2)} dB, "
        f"SSIM {_cell(recon['ssim'], 3)}.",
        "",
        "| missing views | method | PSNR dB | SSIM | coherence |",
        "|---|---|---|---|---|",
    ]
    for row in verdict["imputation"]:
        lines.append(
            f"| {row['missing']} | {row['method']} | {_cell(row['psnr'], 2)} | "
            f"{_cell(row['ssim'], 3)} | {_cell(row['coherence'], 3)} |"
        )
    if not verdict["coherence_measured"]:
        lines += ["", "Coherence is not measured: the dataset has no labels."]
    if verdict["best_psnr"]:
        best = "; ".join(f"{k} missing: {m}" for k, m in verdict["best_psnr"].items())
        lines += [
            "",
            f"Best PSNR on this data: {best}. The receiver serves the diffusion "
            "imputer by default, the ridge regressor with `--imputer ridge`.",
        ]
    lines += ["", f"**Verdict:** {verdict['sentence']}", ""]
    return "\n".join(lines)
