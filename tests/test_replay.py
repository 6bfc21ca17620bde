"""``mvld-data replay``: a dataset through the real ``mvld-edge`` and ``mvld-receiver`` processes.

A tiny random model (checkpoint and encoder.onnx in one folder, as the shipped model is laid
out) and a tiny 3-camera dataset whose frame sets 3 and 10 miss a view. The runs are real: the
command starts both services on loopback and the test reads what they wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import write_tiny_rig
from receiver_fixtures import make_tiny_model

from mvld.common.dataset import FrameSetFolder
from mvld.common.errors import ConfigError
from mvld.data_cli import main as data_main
from mvld.edge.node import EdgeConfig
from mvld.export.onnx_export import ExportOptions, export_model
from mvld.model.checkpoint import save_mvld_model

FRAME_SETS = 12  # write_tiny_rig drops a view in frame sets 3 and 10: 10 complete ones
COMPLETE = 10


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("replay_model")
    checkpoint = save_mvld_model(root / "last", make_tiny_model())
    export_model(checkpoint, root, ExportOptions(exporter="torchscript", parts=("encoder",)))
    return root


@pytest.fixture(scope="module")
def run_folder(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model laid out as ``mvld-train all`` leaves it: score/best.* and export/."""
    run = tmp_path_factory.mktemp("replay_run")
    (run / "score").mkdir()
    (run / "export").mkdir()
    for suffix in (".json", ".safetensors"):
        (run / "score" / f"best{suffix}").symlink_to(model_folder / f"last{suffix}")
    (run / "export" / "encoder.onnx").symlink_to(model_folder / "encoder.onnx")
    return run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_rig(
        tmp_path_factory.mktemp("replay_data") / "data", count=FRAME_SETS, size=32
    )


def _replay(dataset: Path, out: Path, model: Path, *args: str) -> dict:
    code = data_main(
        [
            "replay",
            str(dataset),
            "--out",
            str(out),
            "--model",
            str(model),
            "--fps",
            "20",
            "--steps",
            "8",
            "-q",
            *args,
        ]
    )
    assert code == 0, (out / "logs" / "receiver.log").read_text()[-3000:]
    return json.loads((out / "summary.json").read_text())


def _framesets(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "framesets.jsonl").read_text().splitlines()]


def _complete_stems(dataset: Path) -> list[str]:
    with FrameSetFolder(dataset) as folder:
        return [
            stem for stem, row in zip(folder.stems, folder.presence(), strict=True) if row.all()
        ]


def test_a_missing_camera_comes_back_imputed_and_every_frame_set_is_accounted_for(
    dataset: Path, model_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary = _replay(dataset, out, model_folder, "--missing", "cam1")
    stems = _complete_stems(dataset)
    assert len(stems) == COMPLETE
    assert summary["sent"] == COMPLETE and summary["skipped_incomplete"] == FRAME_SETS - COMPLETE
    assert summary["received"] + sum(summary["dropped"].values()) == summary["sent"]
    assert summary["received"] == COMPLETE, summary["dropped"]  # nothing is dropped for pace
    assert summary["missing"] == ["cam1"]
    assert summary["views"] == {"observed": 2 * COMPLETE, "imputed": COMPLETE}
    assert summary["imputed_views"] == COMPLETE
    psnr = summary["psnr_db"]
    assert psnr["cam1"]["imputed_views"] == COMPLETE and psnr["cam1"]["observed"] is None
    assert psnr["cam0"]["observed_views"] == COMPLETE and psnr["cam0"]["imputed"] is None
    assert 0 < psnr["all"]["observed"] < 100

    records = _framesets(out)
    assert [r["stem"] for r in records] == stems and all(r["received"] for r in records)
    for record in records:
        by_camera = {view["camera"]: view for view in record["views"]}
        assert by_camera["cam1"]["status"] == "withheld"
        assert by_camera["cam1"]["provenance"] == "imputed"
        assert {by_camera[c]["provenance"] for c in ("cam0", "cam2")} == {"observed"}
        assert all(view["psnr_db"] is not None for view in record["views"])
    # The decoded views form a dataset folder again, named by the dataset's stems.
    with FrameSetFolder(out / "received") as received:
        assert received.cameras == ["cam0", "cam1", "cam2"] and received.stems == stems
        assert bool(received.presence().all())

    # Lockstep: every frame set holds a frame no earlier frame set had, for every camera, so
    # frame set i is frame i of each camera folder (a reused frame keeps its capture time).
    results = [
        json.loads(line) for line in (out / "logs" / "results.jsonl").read_text().splitlines()
    ]
    times = np.array(
        [
            [view["capture_time"] for view in r["views"]]
            for r in sorted(results, key=lambda r: r["seq"])
        ]
    )
    assert (np.diff(times, axis=0) > 0).all()
    assert not (out / ".sources").exists() and not (out / ".receiver-save").exists()


def test_a_random_pattern_withholds_one_seeded_camera_per_frame_set(
    dataset: Path, run_folder: Path, tmp_path: Path
) -> None:
    summary = _replay(
        dataset,
        tmp_path / "out",
        run_folder,
        "--missing-random",
        "1",
        "--seed",
        "3",
        "--frames",
        "6",
    )
    assert summary["sent"] == 6 and summary["received"] == 6
    records = _framesets(tmp_path / "out")
    imputed = [
        [view["camera"] for view in r["views"] if view["provenance"] == "imputed"] for r in records
    ]
    assert all(len(cameras) == 1 for cameras in imputed), imputed
    assert len({cameras[0] for cameras in imputed}) > 1  # a pattern, not one fixed camera
    assert summary["imputed_views"] == 6


def _error_of(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert data_main(["replay", *argv]) == 1
    return capsys.readouterr().err


def test_bad_input_is_one_clear_line_before_anything_starts(
    dataset: Path, model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = str(tmp_path / "out")
    model = ["--model", str(model_folder)]
    assert "does not exist" in _error_of(capsys, str(tmp_path / "nope"), "--out", out, *model)
    error = _error_of(capsys, str(dataset), "--out", out, *model, "--missing", "left")
    assert "unknown camera 'left'" in error and "cam0, cam1, cam2" in error
    small = write_tiny_rig(tmp_path / "small", count=3, size=24)
    error = _error_of(capsys, str(small), "--out", out, *model)
    assert "32x32" in error and "24x24" in error and "--size 32x32" in error
    error = _error_of(
        capsys, str(dataset), "--out", out, *model, "--missing", "0,1", "--missing-random", "1"
    )
    assert "no camera to send" in error
    error = _error_of(capsys, str(dataset), "--out", out, "--model", str(dataset))
    assert "incomplete" in error
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    assert "not empty" in _error_of(capsys, str(dataset), "--out", str(tmp_path / "full"), *model)
    assert not (tmp_path / "out" / "logs").exists()  # nothing was started


def test_edge_withhold_names_cameras_by_id_or_number() -> None:
    base = {"cameras": ("a", "b", "c"), "connect": ("tcp://127.0.0.1:1",), "model": Path("m")}
    assert EdgeConfig(**base, withhold=("1", "cam2")).withheld_ids == {"cam1", "cam2"}
    with pytest.raises(ConfigError, match="unknown camera cam7"):
        EdgeConfig(**base, withhold=("cam7",))
    with pytest.raises(ConfigError, match="at least one must be sent"):
        EdgeConfig(**base, withhold=("0", "1", "2"))


def test_the_command_line_offers_what_the_replay_accepts() -> None:
    from mvld import data_cli, replay

    assert data_cli.REPLAY_IMPUTERS == replay.IMPUTERS
    assert data_cli.REPLAY_HEALTH == replay.HEALTH_CHOICES
