"""The multi-camera dataset folder format (docs/DATASETS.md): a torch-free reader and a writer.

This format is a contract with users, so that field recordings can train the model::

    DATASET/
      cam0/000000.png  cam0/000001.png ...   one folder per camera
      cam1/000000.png  ...                   same file stem across folders = one frame set
      labels.csv       optional: stem,label  (downstream label per frame set)

A missing file for a stem means that view is missing for that frame set. The other accepted
form is one video per camera (``cam0.mp4``, ``cam1.mp4``, ...) whose frames are aligned by
index; frame ``i`` has the stem ``f"{i:06d}"`` (so ``labels.csv`` works for both forms).

Validation happens in two stages, so that opening a 60,000-image dataset stays cheap:

* **On construction** (structure): camera folders, stray files, empty folders, image headers
  (a file that is not a PNG/JPEG/BMP or a decodable image is corrupt), one image size for every
  image, and ``labels.csv`` (syntax, non-negative integer labels, no unknown or duplicate stems).
* **On decode** (pixels): a file with a valid header but broken data is found when it is
  decoded, lazily in ``__getitem__`` or for every view at once in :meth:`FrameSetFolder.check`
  (what ``mvld-data check`` runs).

Every problem raises :class:`~mvld.common.errors.DatasetError` naming the file, unless the
reader was opened with ``skip_bad=True``: then the bad file (or labels row) is left out, the
view counts as missing, and ``(file, reason)`` is appended to ``skipped``.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mvld.common.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")
LABELS_FILE = "labels.csv"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-.]*$")
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True)
class FrameSet:
    """One synchronised capture of every camera: views[v] is HxWx3 uint8 RGB or None (missing)."""

    stem: str
    views: list[np.ndarray | None]
    label: int | None


@dataclass(frozen=True)
class DatasetSummary:
    """What ``mvld-data check`` reports about a dataset."""

    root: Path
    form: str  # "folders" or "videos"
    cameras: list[str]
    frame_sets: int
    image_size: tuple[int, int]
    missing_per_camera: dict[str, int]
    label_histogram: dict[int, int] | None
    unlabelled: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders ``cam2`` before ``cam10`` and ``frame_9`` before ``frame_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def validate_name(name: str, what: str) -> str:
    """Reject camera names and stems that cannot be a file name or a labels.csv field."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise DatasetError(
            f"invalid {what} {name!r}: use letters, digits, '_', '-' and '.', not starting with '.'"
        )
    return name


# ---------------------------------------------------------------- image files


def _png_size(head: bytes) -> tuple[int, int] | None:
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return height, width


def _bmp_size(head: bytes) -> tuple[int, int] | None:
    if len(head) < 26:
        return None
    width, height = struct.unpack("<ii", head[18:26])
    return abs(height), width


def _jpeg_size(handle) -> tuple[int, int] | None:
    """Walk JPEG marker segments up to the first start-of-frame; None if there is none."""
    handle.seek(2)
    while True:
        byte = handle.read(1)
        if byte != b"\xff":
            return None
        while byte == b"\xff":
            byte = handle.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue
        raw = handle.read(2)
        if len(raw) < 2:
            return None
        (length,) = struct.unpack(">H", raw)
        if marker in _JPEG_SOF_MARKERS:
            sof = handle.read(5)
            if len(sof) < 5:
                return None
            height, width = struct.unpack(">HH", sof[1:5])
            return height, width
        handle.seek(length - 2, 1)


def read_image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image from its header (PNG, JPEG, BMP) or by decoding it (other formats)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(32)
            if head.startswith(b"\x89PNG\r\n\x1a\n"):
                size = _png_size(head)
            elif head.startswith(b"\xff\xd8"):
                size = _jpeg_size(handle)
            elif head.startswith(b"BM"):
                size = _bmp_size(head)
            else:
                size = decode_image(path).shape[:2]
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise DatasetError(f"{path}: corrupt image (unreadable header)")
    return int(size[0]), int(size[1])


def decode_image(path: Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB; DatasetError naming the file if it is corrupt."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise DatasetError(f"{path}: corrupt image (cannot be decoded)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def encode_png(path: Path, image: np.ndarray) -> None:
    """Write an HxWx3 uint8 RGB image as PNG."""
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise DatasetError(f"{path}: cannot write image")


# ---------------------------------------------------------------- labels.csv


def read_labels(
    path: Path, known_stems: set[str], skipped: list[tuple[str, str]] | None
) -> dict[str, int]:
    """Parse ``stem,label`` rows (an optional ``stem,label`` header); skip bad rows if asked."""
    labels: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read labels file ({exc})") from exc
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [cell.strip() for cell in row]
        if not cells or cells == [""]:
            continue
        if line_no == 1 and [cell.lower() for cell in cells] == ["stem", "label"]:
            continue
        try:
            stem, label = _parse_label_row(cells, known_stems, labels)
        except DatasetError as exc:
            where = f"{path}:{line_no}"
            if skipped is None:
                raise DatasetError(f"{where}: {exc}") from None
            skipped.append((where, str(exc)))
            continue
        labels[stem] = label
    return labels


def _parse_label_row(
    cells: list[str], known_stems: set[str], seen: dict[str, int]
) -> tuple[str, int]:
    if len(cells) != 2:
        raise DatasetError(f"expected 2 fields 'stem,label', got {len(cells)}")
    stem, text = cells
    if not re.fullmatch(r"\d+", text):
        raise DatasetError(f"bad label {text!r} for stem {stem!r}: expected an integer >= 0")
    if stem not in known_stems:
        raise DatasetError(f"stem {stem!r} names no frame set (no image in any camera)")
    if stem in seen:
        raise DatasetError(f"stem {stem!r} is labelled twice")
    return stem, int(text)


def write_labels(root: Path, labels: dict[str, int]) -> Path:
    """Write ``labels.csv`` (header ``stem,label``, natural stem order)."""
    path = Path(root) / LABELS_FILE
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stem", "label"])
        for stem in sorted(labels, key=natural_key):
            writer.writerow([stem, int(labels[stem])])
    return path


# ---------------------------------------------------------------- reader


class FrameSetFolder:
    """Torch-free reader of a dataset folder; item i is the frame set of ``stems[i]``.

    Structure, image headers, sizes and labels are checked on construction; pixels are decoded
    lazily in ``__getitem__``, or all at once by :meth:`check`. See the module docstring.
    """

    def __init__(self, root: str | Path, *, skip_bad: bool = False) -> None:
        self.root = Path(root)
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, str]] = []
        self.form = "folders"
        self.cameras: list[str] = []
        self._files: list[dict[str, Path]] = []  # folder form: per camera, stem -> file
        self._videos: list[Path] = []  # video form: per camera, the video file
        self._video_lengths: list[int] = []
        self._captures: dict[int, tuple[cv2.VideoCapture, int]] = {}  # camera -> (reader, next)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: not a folder")
        folders, videos = self._scan_root()
        if folders:
            self._index_folders(folders)
        else:
            self.form = "videos"
            self._index_videos(videos)
        if self.form == "videos":
            stems = {f"{i:06d}" for i in range(max(self._video_lengths, default=0))}
        else:
            stems = set().union(*(files.keys() for files in self._files))
        if not stems:
            raise DatasetError(f"{self.root}: no readable frame sets")
        self.stems: list[str] = sorted(stems, key=natural_key)
        self._row = {stem: i for i, stem in enumerate(self.stems)}
        labels_path = self.root / LABELS_FILE
        self.labels: dict[str, int] | None = None
        if labels_path.is_file():
            skipped = self.skipped if skip_bad else None
            self.labels = read_labels(labels_path, set(self.stems), skipped)

    # -- construction helpers

    def _bad(self, path: Path | str, reason: str) -> None:
        """Raise for a bad file, or record it as skipped under ``skip_bad``."""
        if not self.skip_bad:
            raise DatasetError(f"{path}: {reason}")
        log.warning("skipping %s: %s", path, reason)
        self.skipped.append((str(path), reason))

    def _scan_root(self) -> tuple[list[Path], list[Path]]:
        entries = [entry for entry in self.root.iterdir() if not entry.name.startswith(".")]
        folders = sorted((e for e in entries if e.is_dir()), key=lambda e: natural_key(e.name))
        videos = sorted(
            (e for e in entries if e.is_file() and e.suffix.lower() in VIDEO_SUFFIXES),
            key=lambda e: natural_key(e.stem),
        )
        if folders and videos:
            raise DatasetError(
                f"{self.root}: holds both camera folders ({folders[0].name}, ...) and videos "
                f"({videos[0].name}, ...); use one form"
            )
        if not folders and not videos:
            images = [e.name for e in entries if e.suffix.lower() in IMAGE_SUFFIXES]
            hint = ""
            if images:
                hint = f" (images at the top level, e.g. {images[0]}: move them into cam0/)"
            raise DatasetError(f"{self.root}: empty dataset, no camera folders or videos{hint}")
        return folders, videos

    def _index_folders(self, folders: list[Path]) -> None:
        sizes: dict[Path, tuple[int, int]] = {}
        for folder in folders:
            self.cameras.append(folder.name)
            self._files.append(self._index_camera_folder(folder, sizes))
        self.image_size = self._common_size(sizes)
        for files in self._files:
            for stem, path in list(files.items()):
                if sizes[path] != self.image_size:
                    h, w = sizes[path]
                    self._bad(
                        path,
                        f"size mismatch: {h}x{w}, the dataset's images are "
                        f"{self.image_size[0]}x{self.image_size[1]} (HxW)",
                    )
                    del files[stem]

    def _index_camera_folder(
        self, folder: Path, sizes: dict[Path, tuple[int, int]]
    ) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for entry in sorted(folder.iterdir(), key=lambda e: natural_key(e.name)):
            if entry.name.startswith("."):
                continue
            if not entry.is_file() or entry.suffix.lower() not in IMAGE_SUFFIXES:
                kind = "folder" if entry.is_dir() else "non-image file"
                self._bad(
                    entry, f"stray {kind} in a camera folder (images: {', '.join(IMAGE_SUFFIXES)})"
                )
                continue
            if entry.stem in files:
                self._bad(entry, f"duplicate stem {entry.stem!r} (also {files[entry.stem].name})")
                continue
            try:
                sizes[entry] = read_image_size(entry)
            except DatasetError as exc:
                self._bad(entry, str(exc).removeprefix(f"{entry}: "))
                continue
            files[entry.stem] = entry
        if not files:
            self._bad(folder, "empty camera folder (no images)")
        return files

    def _common_size(self, sizes: dict[Path, tuple[int, int]]) -> tuple[int, int]:
        """The dataset's image size: the most common one (so an error names the odd file out)."""
        if not sizes:
            raise DatasetError(f"{self.root}: no readable images")
        return Counter(sizes.values()).most_common(1)[0][0]

    def _index_videos(self, videos: list[Path]) -> None:
        sizes: dict[Path, tuple[int, int]] = {}
        for video in videos:
            if video.stem in self.cameras:
                raise DatasetError(f"{video}: second video for camera {video.stem!r}")
            self.cameras.append(video.stem)
            self._videos.append(video)
            length, size = self._probe_video(video)
            self._video_lengths.append(length)
            if size is not None:
                sizes[video] = size
        self.image_size = self._common_size(sizes)
        for v, video in enumerate(self._videos):
            if video in sizes and sizes[video] != self.image_size:
                h, w = sizes[video]
                self._bad(
                    video,
                    f"size mismatch: {h}x{w}, the other videos are "
                    f"{self.image_size[0]}x{self.image_size[1]} (HxW)",
                )
                self._video_lengths[v] = 0

    def _probe_video(self, video: Path) -> tuple[int, tuple[int, int] | None]:
        """Count the frames (by grabbing, frame-count metadata is unreliable) and read the size."""
        capture = cv2.VideoCapture(str(video))
        try:
            if not capture.isOpened():
                self._bad(video, "corrupt video (cannot be opened)")
                return 0, None
            length = 0
            while capture.grab():
                length += 1
            height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        finally:
            capture.release()
        if length == 0 or height <= 0 or width <= 0:
            self._bad(video, "empty or corrupt video (no frames)")
            return 0, None
        return length, (height, width)

    # -- access

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> FrameSet:
        if not -len(self.stems) <= index < len(self.stems):
            raise IndexError(f"frame set {index} out of range (0..{len(self.stems) - 1})")
        stem = self.stems[index]
        views = [self._read_view(v, index % len(self.stems)) for v in range(len(self.cameras))]
        label = self.labels.get(stem) if self.labels is not None else None
        return FrameSet(stem=stem, views=views, label=label)

    def presence(self) -> np.ndarray:
        """bool [N, V]: which views have a file (or video frame); no image is decoded."""
        if self.form == "videos":
            lengths = np.asarray(self._video_lengths)
            return np.arange(len(self.stems))[:, None] < lengths[None, :]
        return np.array(
            [[stem in files for files in self._files] for stem in self.stems], dtype=bool
        ).reshape(len(self.stems), len(self.cameras))

    def _read_view(self, camera: int, row: int) -> np.ndarray | None:
        """Decode one view; under skip_bad a bad view becomes missing (and is dropped for good)."""
        try:
            if self.form == "videos":
                return self._read_video_frame(camera, row)
            path = self._files[camera].get(self.stems[row])
            if path is None:
                return None
            image = decode_image(path)
            if image.shape[:2] != self.image_size:
                raise DatasetError(f"{path}: size mismatch after decoding: {image.shape[:2]}")
            return image
        except DatasetError as exc:
            if not self.skip_bad:
                raise
            log.warning("skipping view: %s", exc)
            self.skipped.append((self._view_name(camera, row), str(exc)))
            if self.form == "folders":
                del self._files[camera][self.stems[row]]
            else:
                self._video_lengths[camera] = row
            return None

    def _view_name(self, camera: int, row: int) -> str:
        if self.form == "videos":
            return f"{self._videos[camera]}#frame{row}"
        return str(self._files[camera].get(self.stems[row], self.root / self.cameras[camera]))

    def _read_video_frame(self, camera: int, row: int) -> np.ndarray | None:
        """Read frame ``row``; sequential reads are cheap, any other index seeks."""
        if row >= self._video_lengths[camera]:
            return None
        capture, next_row = self._captures.get(camera, (None, -1))
        if capture is None:
            capture = cv2.VideoCapture(str(self._videos[camera]))
            next_row = 0
        if row != next_row:
            capture.set(cv2.CAP_PROP_POS_FRAMES, row)
        ok, frame = capture.read()
        self._captures[camera] = (capture, row + 1)
        if not ok or frame is None:
            raise DatasetError(f"{self._videos[camera]}: cannot decode frame {row}")
        if frame.shape[:2] != self.image_size:
            raise DatasetError(f"{self._videos[camera]}: frame {row} size {frame.shape[:2]}")
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def check(self) -> DatasetSummary:
        """Decode every view (raising, or skipping under skip_bad) and summarise the dataset."""
        for index in range(len(self.stems)):
            self[index]
        self.close()
        return self.summary()

    def summary(self) -> DatasetSummary:
        """Counts from the index alone (run :meth:`check` first to include decoding)."""
        present = self.presence()
        missing = {cam: int((~present[:, v]).sum()) for v, cam in enumerate(self.cameras)}
        histogram = None
        unlabelled = len(self.stems)
        if self.labels is not None:
            histogram = dict(sorted(Counter(self.labels.values()).items()))
            unlabelled = len(self.stems) - len(self.labels)
        return DatasetSummary(
            root=self.root,
            form=self.form,
            cameras=list(self.cameras),
            frame_sets=len(self.stems),
            image_size=self.image_size,
            missing_per_camera=missing,
            label_histogram=histogram,
            unlabelled=unlabelled,
            skipped=list(self.skipped),
        )

    def close(self) -> None:
        """Release open video readers (folder datasets hold no open files)."""
        for capture, _ in self._captures.values():
            capture.release()
        self._captures.clear()

    def __getstate__(self) -> dict:
        """Picklable for DataLoader workers: open video readers stay behind."""
        state = self.__dict__.copy()
        state["_captures"] = {}
        return state

    def __enter__(self) -> FrameSetFolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------- writer


class FrameSetWriter:
    """Writes frame sets in the folder form (PNG per view); ``labels.csv`` on :meth:`close`.

    ``exist_ok=True`` lets several processes write disjoint stems into one folder (each with
    ``write_labels=False``; the parent then calls :func:`write_labels` once).
    """

    def __init__(
        self,
        root: str | Path,
        cameras: list[str],
        *,
        exist_ok: bool = False,
        write_labels: bool = True,
    ) -> None:
        self.root = Path(root)
        if not cameras:
            raise DatasetError("a dataset needs at least one camera")
        self.cameras = [validate_name(cam, "camera name") for cam in cameras]
        if len(set(self.cameras)) != len(self.cameras):
            raise DatasetError(f"duplicate camera names in {self.cameras}")
        if self.root.exists() and not self.root.is_dir():
            raise DatasetError(f"{self.root}: exists and is not a folder")
        if self.root.is_dir() and any(self.root.iterdir()) and not exist_ok:
            raise DatasetError(f"{self.root}: output folder is not empty")
        for cam in self.cameras:
            (self.root / cam).mkdir(parents=True, exist_ok=True)
        self.labels: dict[str, int] = {}
        self.image_size: tuple[int, int] | None = None
        self._write_labels = write_labels
        self._stems: set[str] = set()
        self._closed = False

    def write(
        self, stem: str, views: Sequence[np.ndarray | None], label: int | None = None
    ) -> None:
        """Write one frame set; None views are left out (missing)."""
        if self._closed:
            raise DatasetError(f"{self.root}: writer is closed")
        validate_name(stem, "stem")
        if stem in self._stems:
            raise DatasetError(f"{self.root}: stem {stem!r} written twice")
        if len(views) != len(self.cameras):
            raise DatasetError(f"{len(views)} views for {len(self.cameras)} cameras")
        if all(view is None for view in views):
            raise DatasetError(f"frame set {stem!r} has no views")
        if label is not None and (isinstance(label, bool) or int(label) != label or label < 0):
            raise DatasetError(f"bad label {label!r} for stem {stem!r}: expected an integer >= 0")
        for cam, view in zip(self.cameras, views, strict=True):
            if view is not None:
                self._check_view(stem, cam, view)
                encode_png(self.root / cam / f"{stem}.png", view)
        self._stems.add(stem)
        if label is not None:
            self.labels[stem] = int(label)

    def _check_view(self, stem: str, cam: str, view: np.ndarray) -> None:
        if (
            not isinstance(view, np.ndarray)
            or view.dtype != np.uint8
            or view.ndim != 3
            or view.shape[2] != 3
        ):
            shape = getattr(view, "shape", None)
            raise DatasetError(f"{cam}/{stem}: expected an HxWx3 uint8 RGB array, got {shape}")
        if self.image_size is None:
            self.image_size = (view.shape[0], view.shape[1])
        elif view.shape[:2] != self.image_size:
            raise DatasetError(
                f"{cam}/{stem}: size {view.shape[:2]} differs from the dataset's {self.image_size}"
            )

    def close(self) -> None:
        """Finish the dataset: write labels.csv if any label was given."""
        if self._closed:
            return
        self._closed = True
        if self._write_labels and self.labels:
            write_labels(self.root, self.labels)

    def __enter__(self) -> FrameSetWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------------ sequences (video order)

METADATA_FILE = "dataset.json"  # optional facts the folders cannot show (docs/DATASETS.md)
RENDER_FILE = "render.json"  # written by `mvld-data render`


@dataclass(frozen=True)
class Scenes:
    """Which frame sets are consecutive video frames: the scene of each, and the frame rate.

    Frame sets are in natural stem order; consecutive frame sets of one scene are
    ``1 / fps`` seconds apart, and a *cut* (a new scene) starts a new, unrelated sequence.
    Video-aware training pairs a frame set only with earlier frame sets of its own scene.
    """

    fps: float
    scene: np.ndarray  # int64 [N]: scene index of each frame set, non-decreasing

    def position(self) -> np.ndarray:
        """int64 ``[N]``: frames since the start of each frame set's scene."""
        starts = np.r_[True, self.scene[1:] != self.scene[:-1]]
        first = np.maximum.accumulate(np.where(starts, np.arange(len(self.scene)), 0))
        return np.arange(len(self.scene)) - first


def read_scenes(root: str | Path, stems: list[str]) -> Scenes | None:
    """The scenes of a dataset whose frame sets are ``stems`` (in order); None if unknown.

    From ``dataset.json``'s ``"sequence": {"fps": F, "scene_starts": [stem, ...]}`` (a new
    scene at each listed stem; the first frame set always starts one), else from the
    ``render.json`` of ``mvld-data render`` (its episodes are the scenes). A dataset with
    neither is a set of unordered frame sets. A malformed ``sequence`` is a DatasetError.
    """
    root = Path(root)
    metadata = _read_json(root / METADATA_FILE)
    if isinstance(metadata, dict) and "sequence" in metadata:
        return _declared_scenes(root, metadata["sequence"], stems)
    render = _read_json(root / RENDER_FILE)
    rig = render.get("rig") if isinstance(render, dict) else None
    if isinstance(rig, dict) and "fps" in rig and "frames_per_episode" in rig:
        per = int(rig["frames_per_episode"])
        index = np.array([int(stem) if stem.isdigit() else -1 for stem in stems])
        if (index < 0).any() or per < 1:
            raise DatasetError(
                f"{root}: render.json describes episodes, but the stems are not "
                f"the frame numbers mvld-data render writes"
            )
        return Scenes(float(rig["fps"]), index // per)
    return None


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable JSON: {exc}") from exc


def _declared_scenes(root: Path, sequence: object, stems: list[str]) -> Scenes:
    where = f'{root / METADATA_FILE}: "sequence"'
    if (
        not isinstance(sequence, dict)
        or not isinstance(sequence.get("fps"), int | float)
        or not sequence["fps"] > 0
    ):
        raise DatasetError(f'{where} must be an object with a positive "fps"')
    starts = sequence.get("scene_starts", [])
    if not isinstance(starts, list) or not all(isinstance(s, str) for s in starts):
        raise DatasetError(f'{where}: "scene_starts" must be a list of stems')
    row = {stem: i for i, stem in enumerate(stems)}
    unknown = [s for s in starts if s not in row]
    if unknown:
        raise DatasetError(f"{where}: scene_starts names no frame set: {unknown[:3]}")
    cut = np.zeros(len(stems), dtype=np.int64)
    cut[[row[s] for s in starts if row[s] > 0]] = 1
    return Scenes(float(sequence["fps"]), np.cumsum(cut))
