"""The dataset folder format: round trips, a foreign script's dataset, videos, every error case."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvld.common.dataset import FrameSetFolder, FrameSetWriter, read_image_size
from mvld.common.errors import DatasetError

CAMERAS = ["cam0", "cam1", "cam2"]
H, W = 24, 32


def _views(rng: np.random.Generator, count: int = 3) -> list[np.ndarray]:
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, dict[str, list[np.ndarray | None]]]:
    """Five frame sets written by FrameSetWriter; frame set 2 lacks cam1, 4 lacks cam0+cam2."""
    rng = np.random.default_rng(0)
    written: dict[str, list[np.ndarray | None]] = {}
    root = tmp_path / "ds"
    with FrameSetWriter(root, CAMERAS) as writer:
        for i in range(5):
            views: list[np.ndarray | None] = list(_views(rng))
            if i == 2:
                views[1] = None
            if i == 4:
                views[0] = views[2] = None
            stem = f"{i:06d}"
            writer.write(stem, views, label=i % 3)
            written[stem] = views
    return root, written


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def test_round_trip_is_exact_and_missing_views_are_none(dataset) -> None:
    root, written = dataset
    folder = FrameSetFolder(root)
    assert folder.cameras == CAMERAS
    assert folder.stems == sorted(written)
    assert folder.image_size == (H, W)
    assert folder.labels == {stem: i % 3 for i, stem in enumerate(sorted(written))}
    for index, stem in enumerate(folder.stems):
        frame_set = folder[index]
        assert frame_set.stem == stem
        assert frame_set.label == index % 3
        for got, want in zip(frame_set.views, written[stem], strict=True):
            if want is None:
                assert got is None
            else:
                assert got.dtype == np.uint8 and got.shape == (H, W, 3)
                np.testing.assert_array_equal(got, want)  # RGB order preserved, lossless
    expected = np.array([[v is not None for v in written[s]] for s in folder.stems])
    np.testing.assert_array_equal(folder.presence(), expected)


def test_foreign_script_dataset_without_header_jpeg_and_natural_order(tmp_path: Path) -> None:
    """A dataset written by someone else's script: JPEGs, unpadded stems, no labels header."""
    rng = np.random.default_rng(1)
    root = tmp_path / "field"
    for cam in ("cam10", "cam2"):
        for stem in ("frame_9", "frame_10"):
            (root / cam).mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            assert cv2.imwrite(str(root / cam / f"{stem}.jpg"), image)
    (root / "labels.csv").write_text("frame_9,4\nframe_10,7\n")
    folder = FrameSetFolder(root)
    assert folder.cameras == ["cam2", "cam10"]
    assert folder.stems == ["frame_9", "frame_10"]
    assert folder.labels == {"frame_9": 4, "frame_10": 7}
    assert folder[1].label == 7 and folder[1].views[0].shape == (H, W, 3)
    assert folder.check().frame_sets == 2


def test_summary_counts_missing_views_and_labels(dataset) -> None:
    root, _ = dataset
    summary = FrameSetFolder(root).check()
    assert summary.frame_sets == 5
    assert summary.missing_per_camera == {"cam0": 1, "cam1": 1, "cam2": 1}
    assert summary.label_histogram == {0: 2, 1: 2, 2: 1}
    assert summary.unlabelled == 0 and summary.skipped == []


def test_header_sizes_match_decoding_for_each_format(tmp_path: Path) -> None:
    image = np.zeros((33, 77, 3), np.uint8)
    for suffix in (".png", ".jpg", ".bmp", ".webp", ".tiff"):
        path = tmp_path / f"a{suffix}"
        assert cv2.imwrite(str(path), image)
        assert read_image_size(path) == (33, 77), suffix


def test_video_per_camera_aligned_by_index(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    root.mkdir()
    lengths = {"cam0": 12, "cam1": 10}
    for cam, length in lengths.items():
        writer = cv2.VideoWriter(
            str(root / f"{cam}.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H)
        )
        for i in range(length):
            writer.write(np.full((H, W, 3), 20 * i, np.uint8))
        writer.release()
    (root / "labels.csv").write_text("stem,label\n000000,1\n000011,2\n")
    folder = FrameSetFolder(root)
    assert folder.form == "videos" and folder.cameras == ["cam0", "cam1"]
    assert len(folder) == 12 and folder.labels == {"000000": 1, "000011": 2}
    assert folder.presence()[:, 1].tolist() == [True] * 10 + [False] * 2
    for index in (0, 1, 7, 3, 11):  # sequential reads and seeks both land on the right frame
        views = folder[index].views
        assert abs(float(views[0].mean()) - 20 * index) < 4, index
    assert folder[11].views[1] is None
    clone = pickle.loads(pickle.dumps(folder))  # DataLoader workers pickle the reader
    assert abs(float(clone[5].views[1].mean()) - 100) < 4
    folder.close()


# ---------------------------------------------------------------- errors


def test_corrupt_image_header_is_named(dataset) -> None:
    root, _ = dataset
    bad = root / "cam1" / "000003.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match=r"cam1/000003\.png: corrupt image"):
        FrameSetFolder(root)
    folder = FrameSetFolder(root, skip_bad=True)
    assert [Path(f).name for f, _ in folder.skipped] == ["000003.png"]
    assert folder.presence()[3].tolist() == [True, False, True]
    assert folder[3].views[1] is None


def test_truncated_image_found_lazily_and_by_check(dataset) -> None:
    root, _ = dataset
    bad = root / "cam2" / "000001.png"
    bad.write_bytes(bad.read_bytes()[:60])  # valid header, broken pixel data
    folder = FrameSetFolder(root)  # structure is fine: pixels are decoded later
    with pytest.raises(DatasetError, match=r"cam2/000001\.png: corrupt image"):
        folder[1]
    with pytest.raises(DatasetError, match=r"cam2/000001\.png"):
        FrameSetFolder(root).check()
    lenient = FrameSetFolder(root, skip_bad=True)
    summary = lenient.check()
    assert len(summary.skipped) == 1 and summary.missing_per_camera["cam2"] == 2
    assert lenient[1].views[2] is None and not lenient.presence()[1, 2]


def test_size_mismatch_names_the_odd_file(dataset) -> None:
    root, _ = dataset
    _write_png(root / "cam0" / "000002.png", np.zeros((H + 1, W, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"cam0/000002\.png: size mismatch: 25x32"):
        FrameSetFolder(root)
    folder = FrameSetFolder(root, skip_bad=True)
    assert folder.image_size == (H, W) and len(folder.skipped) == 1
    assert not folder.presence()[2, 0]


def test_stray_non_image_file_and_subfolder(dataset) -> None:
    root, _ = dataset
    (root / "cam1" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"cam1/notes\.txt: stray non-image file"):
        FrameSetFolder(root)
    (root / "cam1" / "notes.txt").unlink()
    (root / "cam1" / "sub").mkdir()
    with pytest.raises(DatasetError, match=r"cam1/sub: stray folder"):
        FrameSetFolder(root)
    assert len(FrameSetFolder(root, skip_bad=True).skipped) == 1
    (root / "cam1" / "sub").rmdir()
    (root / "cam1" / ".DS_Store").write_text("hidden files are ignored")
    assert len(FrameSetFolder(root)) == 5


def test_empty_camera_folder_and_empty_dataset(tmp_path: Path, dataset) -> None:
    root, _ = dataset
    (root / "cam3").mkdir()
    with pytest.raises(DatasetError, match=r"cam3: empty camera folder"):
        FrameSetFolder(root)
    folder = FrameSetFolder(root, skip_bad=True)
    assert folder.cameras == [*CAMERAS, "cam3"] and not folder.presence()[:, 3].any()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty dataset"):
        FrameSetFolder(empty)
    _write_png(empty / "000000.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DatasetError, match="images at the top level"):
        FrameSetFolder(empty)
    with pytest.raises(DatasetError, match="not a folder"):
        FrameSetFolder(tmp_path / "missing")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("000000,1\nghost,2\n", r"labels\.csv:2: stem 'ghost' names no frame set"),
        ("000000,cat\n", r"labels\.csv:1: bad label 'cat'"),
        ("000000,-1\n", r"labels\.csv:1: bad label '-1'"),
        ("000000,1.5\n", r"labels\.csv:1: bad label '1\.5'"),
        ("stem,label\n000000,1\n000000,2\n", r"labels\.csv:3: stem '000000' is labelled twice"),
        ("000000,1,2\n", r"labels\.csv:1: expected 2 fields"),
    ],
)
def test_bad_labels_file(dataset, text: str, message: str) -> None:
    root, _ = dataset
    (root / "labels.csv").write_text(text)
    with pytest.raises(DatasetError, match=message):
        FrameSetFolder(root)
    lenient = FrameSetFolder(root, skip_bad=True)
    assert len(lenient.skipped) == 1 and "labels.csv" in lenient.skipped[0][0]


def test_unlabelled_stems_and_absent_labels(dataset) -> None:
    root, _ = dataset
    (root / "labels.csv").write_text("000001,3\n")
    folder = FrameSetFolder(root)
    assert folder[0].label is None and folder[1].label == 3
    assert folder.summary().unlabelled == 4
    (root / "labels.csv").unlink()
    assert FrameSetFolder(root).labels is None


def test_folders_and_videos_together_are_ambiguous(dataset) -> None:
    root, _ = dataset
    (root / "cam0.mp4").write_bytes(b"")
    with pytest.raises(DatasetError, match="both camera folders"):
        FrameSetFolder(root)


def test_corrupt_video_is_named(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    root.mkdir()
    (root / "cam0.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match=r"cam0\.mp4: .*corrupt video"):
        FrameSetFolder(root)


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    with FrameSetWriter(tmp_path / "w", ["cam0", "cam1"]) as writer:
        writer.write("a", _views(rng, 2))
        with pytest.raises(DatasetError, match="written twice"):
            writer.write("a", _views(rng, 2))
        with pytest.raises(DatasetError, match="3 views for 2 cameras"):
            writer.write("b", _views(rng, 3))
        with pytest.raises(DatasetError, match="no views"):
            writer.write("b", [None, None])
        with pytest.raises(DatasetError, match="invalid stem"):
            writer.write("../escape", _views(rng, 2))
        with pytest.raises(DatasetError, match="differs from the dataset"):
            writer.write("b", [np.zeros((H, W + 2, 3), np.uint8), None])
        with pytest.raises(DatasetError, match="uint8 RGB"):
            writer.write("b", [np.zeros((H, W, 3), np.float32), None])
        with pytest.raises(DatasetError, match="bad label"):
            writer.write("b", _views(rng, 2), label=-3)
    assert not (tmp_path / "w" / "labels.csv").exists()  # no label given, no labels file
    with pytest.raises(DatasetError, match="not empty"):
        FrameSetWriter(tmp_path / "w", ["cam0", "cam1"])
    with pytest.raises(DatasetError, match="duplicate camera"):
        FrameSetWriter(tmp_path / "x", ["cam0", "cam0"])


def test_torch_dataset_tensors_mask_and_labels(dataset) -> None:
    torch = pytest.importorskip("torch")
    from mvld.train.dataset import MultiViewDataset, scale_to_unit

    root, written = dataset
    data = MultiViewDataset(root)
    views, present, label = data[2]
    assert views.shape == (3, 3, H, W) and views.dtype == torch.float32
    assert present.tolist() == [True, False, True] and int(label) == 2
    assert float(views[1].abs().sum()) == 0.0
    want = torch.from_numpy(written["000002"][0]).permute(2, 0, 1).float() / 255
    assert torch.allclose(views[0], want)
    loader = torch.utils.data.DataLoader(data, batch_size=5, num_workers=0)
    batch_views, batch_present, batch_labels = next(iter(loader))
    assert batch_views.shape == (5, 3, 3, H, W) and batch_present.shape == (5, 3)
    assert batch_labels.tolist() == [0, 1, 2, 0, 1]
    small = MultiViewDataset(root, preprocess=lambda im: scale_to_unit(im, (12, 16)))
    assert small[0][0].shape == (3, 3, 12, 16)
    (root / "labels.csv").unlink()
    assert int(MultiViewDataset(root)[0][2]) == -1


def test_torch_dataset_with_the_shared_model_preprocessing(dataset) -> None:
    pytest.importorskip("torch")
    from mvld.common.preprocess import PreprocessConfig
    from mvld.train.dataset import MultiViewDataset, shared_preprocess

    root, _ = dataset
    config = PreprocessConfig(height=12, width=16, low=-1.0, high=1.0)
    views, present, _ = MultiViewDataset(root, preprocess=shared_preprocess(config))[0]
    assert views.shape == (3, 3, 12, 16) and present.all()
    assert float(views.min()) >= -1.0 and float(views.max()) <= 1.0 and float(views.min()) < 0


@settings(max_examples=25, deadline=None)
@given(
    presence=st.lists(
        st.lists(st.booleans(), min_size=2, max_size=2), min_size=1, max_size=6
    ).filter(lambda rows: all(any(row) for row in rows)),
    labels=st.lists(st.one_of(st.none(), st.integers(0, 9)), min_size=6, max_size=6),
    size=st.tuples(st.integers(8, 20), st.integers(8, 20)),
)
def test_any_presence_pattern_and_labels_round_trip(
    tmp_path_factory: pytest.TempPathFactory, presence, labels, size
) -> None:
    """Whatever views are missing and whichever frame sets are labelled, the reader agrees."""
    root = tmp_path_factory.mktemp("prop") / "ds"
    rng = np.random.default_rng(len(presence))
    with FrameSetWriter(root, ["a", "b"]) as writer:
        for i, row in enumerate(presence):
            views = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) if p else None for p in row]
            writer.write(f"s{i}", views, labels[i])
    written_cameras = [any(row[v] for row in presence) for v in range(2)]
    if not all(written_cameras):  # a camera with no view at all is an empty folder
        with pytest.raises(DatasetError, match="empty camera folder"):
            FrameSetFolder(root)
        return
    folder = FrameSetFolder(root)
    assert folder.stems == [f"s{i}" for i in range(len(presence))]
    assert folder.presence().tolist() == presence
    assert folder.image_size == size
    given_labels = {
        f"s{i}": label for i, label in enumerate(labels[: len(presence)]) if label is not None
    }
    assert folder.labels == (given_labels or None)
