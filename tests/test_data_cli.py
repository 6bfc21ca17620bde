"""``mvld-data``: render, check and record through the real command, plus its error paths."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from mvld.common.dataset import FrameSetFolder
from mvld.data_cli import main


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "render.json"
    }


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("render") / "ds"
    code = main(
        [
            "render",
            "--cameras",
            "3",
            "--frames",
            "10",
            "--episode-frames",
            "4",
            "--out",
            str(out),
            "--seed",
            "3",
            "--workers",
            "1",
            "-q",
        ]
    )
    assert code == 0
    return out


def test_render_writes_a_labelled_dataset_that_loads(rendered: Path) -> None:
    folder = FrameSetFolder(rendered)
    assert folder.cameras == ["cam0", "cam1", "cam2"] and len(folder) == 10
    assert folder.image_size == (64, 64) and folder.presence().all()
    assert folder.labels is not None and len(folder.labels) == 10
    # One label per episode of 4 frame sets.
    labels = [folder.labels[stem] for stem in folder.stems]
    assert labels[0:4] == [labels[0]] * 4 and labels[4:8] == [labels[4]] * 4
    meta = json.loads((rendered / "render.json").read_text())
    assert meta["seed"] == 3 and len(meta["cameras"]) == 3 and "duck" in meta["classes"]
    assert np.array(meta["cameras"]["cam1"]["K"]).shape == (3, 3)


def test_render_is_deterministic_for_a_seed_whatever_the_worker_count(
    rendered: Path, tmp_path: Path
) -> None:
    out = tmp_path / "two_workers"
    code = main(
        [
            "render",
            "--frames",
            "10",
            "--episode-frames",
            "4",
            "--out",
            str(out),
            "--seed",
            "3",
            "--workers",
            "2",
            "-q",
        ]
    )
    assert code == 0
    assert _tree(out) == _tree(rendered)
    other = tmp_path / "other_seed"
    main(
        [
            "render",
            "--frames",
            "4",
            "--episode-frames",
            "4",
            "--out",
            str(other),
            "--seed",
            "4",
            "--workers",
            "1",
            "-q",
        ]
    )
    assert _tree(other)["cam0/000000.png"] != _tree(rendered)["cam0/000000.png"]


def test_check_prints_cameras_missing_views_and_histogram(
    rendered: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["check", str(rendered)]) == 0
    out = capsys.readouterr().out
    assert "cameras    3: cam0, cam1, cam2" in out and "frame sets 10" in out
    assert "cam2" in out and "0.0%" in out and out.rstrip().endswith("OK")
    histogram = {
        int(line.split()[0]): int(line.split()[1])
        for line in out.splitlines()
        if line.startswith("  ") and line.split()[0].isdigit()
    }
    assert sum(histogram.values()) == 10


def test_check_writes_a_sample_grid(rendered: Path, tmp_path: Path) -> None:
    grid_path = tmp_path / "grid.png"
    assert main(["check", str(rendered), "--grid", str(grid_path), "--grid-rows", "3"]) == 0
    grid = cv2.imread(str(grid_path))
    assert grid.shape == (3 * (128 + 22), 3 * 128, 3)  # 3 rows, 3 cameras, 64 px upscaled x2
    assert grid[22:150, :128].std() > 10  # a rendered view, not an empty tile


def test_progress_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["render", "--frames", "2", "--out", str(tmp_path / "p"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "2/2" in captured.err and "rendered 2 frame sets" in captured.out


def test_progress_falls_back_to_a_plain_line_without_tqdm(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes ``from tqdm import tqdm`` fail
    assert main(["render", "--frames", "3", "--out", str(tmp_path / "p"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "render: 3/3 (" in err and "frame set/s" not in err  # not tqdm's format


def _write_bad(root: Path, case: str) -> str:
    """Break a copy of a valid dataset in one way; returns the text the error must contain."""
    if case == "corrupt":
        (root / "cam1" / "000003.png").write_bytes(b"garbage")
        return "cam1/000003.png: corrupt image"
    if case == "truncated":
        path = root / "cam0" / "000005.png"
        path.write_bytes(path.read_bytes()[:80])
        return "cam0/000005.png: corrupt image"
    if case == "size":
        cv2.imwrite(str(root / "cam2" / "000001.png"), np.zeros((32, 64, 3), np.uint8))
        return "cam2/000001.png: size mismatch"
    if case == "stray":
        (root / "cam0" / "Thumbs.db").write_bytes(b"x")
        return "cam0/Thumbs.db: stray non-image file"
    if case == "empty":
        (root / "cam3").mkdir()
        return "cam3: empty camera folder"
    if case == "labels":
        with open(root / "labels.csv", "a") as handle:
            handle.write("999999,1\n")
        return "stem '999999' names no frame set"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["corrupt", "truncated", "size", "stray", "empty", "labels"])
def test_check_rejects_broken_datasets_naming_the_file(
    rendered: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(rendered, broken)
    expected = _write_bad(broken, case)
    assert main(["check", str(broken)]) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert main(["check", str(broken), "--all-problems"]) == 1
    out = capsys.readouterr().out
    assert "INVALID: 1 problems" in out and expected.split(":")[0] in out


def test_check_accepts_a_dataset_written_by_another_script(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "field"
    rng = np.random.default_rng(0)
    for cam in ("left", "right"):
        (root / cam).mkdir(parents=True)
        for i in range(3):
            if (cam, i) != ("right", 1):
                image = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
                cv2.imwrite(str(root / cam / f"t{i:03d}.jpg"), image)
    (root / "labels.csv").write_text("t000,0\nt001,2\nt002,2\n")
    assert main(["check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "cameras    2: left, right" in out and "images 48x80" in out
    assert re.search(r"right\s+1\s+\(33\.3%\)", out)


def test_record_from_sim_sources(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rec"
    cams = ",".join(f"sim://{v}?realtime=false&seed=2" for v in range(3))
    assert main(["record", "--cams", cams, "--out", str(out), "--frames", "5", "-q"]) == 0
    folder = FrameSetFolder(out)
    assert len(folder) == 5 and folder.cameras == ["cam0", "cam1", "cam2"]
    frame_sets = [folder[i] for i in range(5)]
    assert not np.array_equal(frame_sets[0].views[0], frame_sets[4].views[0]), "scene moves"
    assert json.loads((out / "record.json").read_text())["frame_sets"] == 5
    assert main(["check", str(out)]) == 0


def test_record_from_video_and_image_folder_with_resizing(tmp_path: Path) -> None:
    video = tmp_path / "cam.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(4):  # shorter than the folder: its views go missing at the end
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((30, 40, 3), 30 * i, np.uint8))
    out = tmp_path / "rec"
    cams = f"{video},file://{folder}"
    assert main(["record", "--cams", cams, "--out", str(out), "--frames", "10", "-q"]) == 1
    assert (
        main(
            [
                "record",
                "--cams",
                cams,
                "--out",
                str(tmp_path / "rec2"),
                "--frames",
                "10",
                "--size",
                "24x32",
                "-q",
            ]
        )
        == 0
    )
    recorded = FrameSetFolder(tmp_path / "rec2")
    assert len(recorded) == 6 and recorded.image_size == (24, 32)
    assert recorded.presence()[:, 0].tolist() == [True] * 4 + [False] * 2
    assert abs(float(recorded[2].views[0].mean()) - 80) < 5


def test_record_size_mismatch_is_a_clear_error(tmp_path: Path, capsys) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, shape in ((first, (20, 20, 3)), (second, (10, 10, 3))):
        folder.mkdir()
        cv2.imwrite(str(folder / "0.png"), np.zeros(shape, np.uint8))
    code = main(
        [
            "record",
            "--cams",
            f"{first},{second}",
            "--out",
            str(tmp_path / "o"),
            "--frames",
            "1",
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "gives 10x10 frames but the recording is 20x20" in err
    assert "--size" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["render", "--frames", "0", "--out", "{tmp}/x"], 1, "frames must be >= 1"),
        (["render", "--frames", "3", "--size", "big", "--out", "{tmp}/x"], 2, "expected N or HxW"),
        (["render", "--frames", "3", "--out", "{tmp}/full"], 1, "output folder is not empty"),
        (
            ["record", "--cams", "ftp://cam/1", "--out", "{tmp}/r", "--frames", "2"],
            1,
            "unknown source scheme 'ftp'; valid: csi, device, ",
        ),
        (
            ["record", "--cams", "{tmp}/nothing.mp4", "--out", "{tmp}/r", "--frames", "2"],
            1,
            "no such file or folder",
        ),
        (["render", "--frames", "2", "--out", "{tmp}/full/readme.txt/x"], 1, "Not a directory"),
        (["check", "{tmp}/absent"], 1, "not a folder"),
        (["check", "{tmp}/full"], 1, "empty dataset"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_bad_input_gives_a_clear_error_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], code: int, message: str
) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "readme.txt").write_text("not a dataset")
    assert main([arg.replace("{tmp}", str(tmp_path)) for arg in argv]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_script_renders_without_pybullet_noise(tmp_path: Path) -> None:
    """The installed ``mvld-data`` runs; pybullet's C-level chatter does not leak out."""
    script = str(Path(sys.executable).parent / "mvld-data")
    out = tmp_path / "cli"
    done = subprocess.run(
        [script, "render", "--frames", "2", "--workers", "1", "-q", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rendered 2 frame sets") and done.stderr == ""
    checked = subprocess.run(
        [script, "check", str(out)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0 and checked.stdout.rstrip().endswith("OK")
