"""A simulated multi-camera rig: a pybullet tabletop scene watched by V calibrated cameras.

Rendering uses pybullet's TinyRenderer (CPU, no GL). One *episode* is one random scene: a
central object of one of :data:`SHAPE_CLASSES` (random colour, yaw, scale, small offset from
the table centre) plus 1-3 distractor meshes from ``pybullet_data/random_urdfs`` on a ring near
the table rim, on a randomly tinted textured table. Physics settles the objects, then every
frame the central object turns on a turntable, the distractors get random nudges and the light
drifts, so consecutive frames differ.

Label of a frame set = index of the central object's class in :data:`SHAPE_CLASSES`. It is
visible in every view: distractors are kept out of a wedge around each camera's line of sight
to the centre, so they never stand between a camera and the central object.

An episode is a pure function of ``(seed, episode)``: rendering is deterministic whatever
process renders it. Torch-free (the edge uses this rig as a live source, ``sim://N``).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from mvld.common.dataset import FrameSetWriter, write_labels
from mvld.common.errors import ConfigError


@contextmanager
def _c_output_silenced() -> Iterator[None]:
    """Hide what pybullet prints from C ("pybullet build time", "argv[0]=") past sys.stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in (*saved, devnull):
            os.close(descriptor)


with _c_output_silenced():
    import pybullet
import pybullet_data  # noqa: E402
from pybullet_utils.bullet_client import BulletClient  # noqa: E402

SHAPE_CLASSES = ("duck", "teddy", "bunny", "box", "sphere", "cylinder")
# Mesh files and the rotation that stands each mesh upright (Z up) in pybullet_data.
_MESHES = {
    "duck": ("duck.obj", (math.pi / 2, 0.0, 0.0)),
    "teddy": ("teddy2_VHACD_CHs.obj", (0.0, 0.0, 0.0)),
    "bunny": ("bunny.obj", (math.pi / 2, 0.0, 0.0)),
}
_GROUND_TEXTURES = ("checker_grid.jpg", "checker_blue.png", "tex256.png")
_PHYSICS_HZ = 120
_TABLE_HALF_SIZE = 0.45  # m
_DISTRACTOR_FILES = 1000  # random_urdfs/000 ... random_urdfs/999


@dataclass(frozen=True)
class CameraSpec:
    """One calibrated camera looking at the table centre, on a sphere around it."""

    azimuth_deg: float
    elevation_deg: float = 30.0
    distance: float = 0.5
    fov_deg: float = 40.0

    def intrinsics(self, height: int, width: int) -> np.ndarray:
        """3x3 pinhole matrix K in pixels (vertical field of view, square pixels)."""
        focal = (height / 2) / math.tan(math.radians(self.fov_deg) / 2)
        return np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]])

    def position(self, target: tuple[float, float, float]) -> np.ndarray:
        """Camera centre in world coordinates (metres)."""
        az, el = math.radians(self.azimuth_deg), math.radians(self.elevation_deg)
        offset = self.distance * np.array(
            [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)]
        )
        return np.asarray(target) + offset

    def world_to_camera(self, target: tuple[float, float, float]) -> np.ndarray:
        """4x4 extrinsics in the OpenCV convention (x right, y down, z forward)."""
        eye = self.position(target)
        forward = np.asarray(target) - eye
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        rotation = np.stack([right, down, forward])
        matrix = np.eye(4)
        matrix[:3, :3] = rotation
        matrix[:3, 3] = -rotation @ eye
        return matrix


def ring_of_cameras(
    count: int = 3,
    *,
    elevation_deg: float = 30.0,
    distance: float = 0.5,
    fov_deg: float = 40.0,
    azimuth_offset_deg: float = 0.0,
) -> tuple[CameraSpec, ...]:
    """``count`` cameras evenly spaced in azimuth around the table."""
    if count < 1:
        raise ConfigError(f"a rig needs at least one camera, got {count}")
    return tuple(
        CameraSpec(azimuth_offset_deg + 360.0 * i / count, elevation_deg, distance, fov_deg)
        for i in range(count)
    )


@dataclass(frozen=True)
class RigConfig:
    """Everything that defines the rendered data; saved beside every rendered dataset."""

    cameras: tuple[CameraSpec, ...] = field(default_factory=ring_of_cameras)
    image_size: tuple[int, int] = (64, 64)  # (H, W)
    fps: float = 10.0
    frames_per_episode: int = 20
    distractors: tuple[int, int] = (1, 3)  # inclusive range of the distractor count
    object_size: tuple[float, float] = (0.10, 0.16)  # largest extent of the central object, m
    distractor_ring: tuple[float, float] = (0.16, 0.24)  # radius range around the centre, m
    turntable_speed: tuple[float, float] = (0.3, 1.0)  # rad/s, random sign
    shadows: bool = False  # TinyRenderer shadows cost ~50% more time per view
    target: tuple[float, float, float] = (0.0, 0.0, 0.05)

    def __post_init__(self) -> None:
        if len(self.cameras) < 1:
            raise ConfigError("a rig needs at least one camera")
        height, width = self.image_size
        if not (8 <= height <= 1024 and 8 <= width <= 1024):
            raise ConfigError(f"image size {self.image_size} outside 8..1024 pixels")
        if self.fps <= 0 or self.frames_per_episode < 1:
            raise ConfigError("fps must be > 0 and frames_per_episode >= 1")
        if not 0 <= self.distractors[0] <= self.distractors[1]:
            raise ConfigError(f"bad distractor range {self.distractors}")

    @property
    def num_cameras(self) -> int:
        """V."""
        return len(self.cameras)


@dataclass(frozen=True)
class RenderedFrameSet:
    """One synchronised capture of every camera in the rig."""

    views: list[np.ndarray]  # V x [H, W, 3] uint8 RGB
    label: int
    central_pixels: list[int] | None  # per view: pixels showing the central object, if asked
    time_s: float  # scene time since the episode started


def episode_seed(seed: int, episode: int) -> np.random.SeedSequence:
    """The seed of one episode: a pure function of (seed, episode)."""
    return np.random.SeedSequence([int(seed), int(episode)])


@cache
def _mesh_bounds(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(centre, extent) of an OBJ mesh's vertices, to normalise its scale."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        vertices = np.array(
            [[float(x) for x in line.split()[1:4]] for line in handle if line.startswith("v ")]
        )
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    return (low + high) / 2, high - low


class SimRig:
    """One pybullet world; :meth:`reset` starts an episode, :meth:`advance` moves it on."""

    def __init__(self, config: RigConfig | None = None) -> None:
        self.config = config or RigConfig()
        with _c_output_silenced():
            self._client = BulletClient(connection_mode=pybullet.DIRECT)
        self._data = pybullet_data.getDataPath()
        height, width = self.config.image_size
        self._projections = [
            self._client.computeProjectionMatrixFOV(cam.fov_deg, width / height, 0.02, 5.0)
            for cam in self.config.cameras
        ]
        self._views = [
            self._client.computeViewMatrix(
                cam.position(self.config.target).tolist(), list(self.config.target), [0, 0, 1]
            )
            for cam in self.config.cameras
        ]
        self.label = -1
        self.time_s = 0.0
        self._rng = np.random.default_rng(0)
        self._central = -1
        self._distractors: list[int] = []
        self._light = np.array([1.0, 1.0, 2.0])
        self._spin = 0.0

    # -- scene construction

    def reset(self, seed: int, episode: int = 0) -> None:
        """Build a fresh random scene for (seed, episode) and let it settle."""
        rng = np.random.default_rng(episode_seed(seed, episode))
        self._rng = rng
        client = self._client
        client.resetSimulation()
        client.setGravity(0, 0, -9.81)
        client.setTimeStep(1.0 / _PHYSICS_HZ)
        self._add_table(rng)
        self.label = int(rng.integers(len(SHAPE_CLASSES)))
        self._central = self._add_central(SHAPE_CLASSES[self.label], rng)
        low, high = self.config.distractors
        count = int(rng.integers(low, high + 1))
        self._distractors = [self._add_distractor(rng) for _ in range(count)]
        speed = rng.uniform(*self.config.turntable_speed)
        self._spin = speed * (1 if rng.random() < 0.5 else -1)
        self._light = np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(1.5, 2.5)])
        for _ in range(_PHYSICS_HZ // 2):  # half a second to settle
            client.stepSimulation()
        self.time_s = 0.0

    def _add_table(self, rng: np.random.Generator) -> None:
        """A textured, randomly tinted square table top (renders faster than an endless floor)."""
        client = self._client
        half = [_TABLE_HALF_SIZE, _TABLE_HALF_SIZE, 0.01]
        visual = client.createVisualShape(pybullet.GEOM_BOX, halfExtents=half)
        collision = client.createCollisionShape(pybullet.GEOM_BOX, halfExtents=half)
        table = client.createMultiBody(0, collision, visual, basePosition=[0, 0, -0.01])
        texture_file = _GROUND_TEXTURES[int(rng.integers(len(_GROUND_TEXTURES)))]
        texture = client.loadTexture(os.path.join(self._data, texture_file))
        tint = [*rng.uniform(0.45, 1.0, 3).tolist(), 1.0]
        client.changeVisualShape(table, -1, textureUniqueId=texture, rgbaColor=tint)

    def _add_central(self, shape: str, rng: np.random.Generator) -> int:
        size = rng.uniform(*self.config.object_size)
        colour = [*rng.uniform(0.05, 1.0, 3).tolist(), 1.0]
        yaw = rng.uniform(-math.pi, math.pi)
        xy = rng.uniform(-0.03, 0.03, 2)
        roll, pitch = 0.0, 0.0
        if shape in _MESHES:
            filename, (roll, pitch, _) = _MESHES[shape]
            body = self._add_mesh(os.path.join(self._data, filename), size, colour)
        else:
            body = self._add_primitive(shape, size, colour)
        orientation = self._client.getQuaternionFromEuler([roll, pitch, yaw])
        self._client.resetBasePositionAndOrientation(
            body, [xy[0], xy[1], size / 2 + 0.01], orientation
        )
        return body

    def _add_primitive(self, shape: str, size: float, colour: list[float]) -> int:
        client = self._client
        if shape == "box":
            half = [size / 2, size / 2 * 0.8, size / 2 * 0.7]
            visual = client.createVisualShape(pybullet.GEOM_BOX, halfExtents=half, rgbaColor=colour)
            collision = client.createCollisionShape(pybullet.GEOM_BOX, halfExtents=half)
        elif shape == "sphere":
            visual = client.createVisualShape(
                pybullet.GEOM_SPHERE, radius=size / 2, rgbaColor=colour
            )
            collision = client.createCollisionShape(pybullet.GEOM_SPHERE, radius=size / 2)
        else:  # upright cylinder
            radius, length = size * 0.3, size
            visual = client.createVisualShape(
                pybullet.GEOM_CYLINDER, radius=radius, length=length, rgbaColor=colour
            )
            collision = client.createCollisionShape(
                pybullet.GEOM_CYLINDER, radius=radius, height=length
            )
        return client.createMultiBody(0.2, collision, visual)

    def _add_mesh(self, path: str, size: float, colour: list[float]) -> int:
        """A mesh scaled so its largest extent is ``size``, its origin at the mesh centre.

        It collides as its bounding box: a convex hull of a 1,000-vertex mesh made physics
        cost more than rendering, and a box rests on the table just as well.
        """
        centre, extent = _mesh_bounds(path)
        scale = size / float(extent.max())
        client = self._client
        visual = client.createVisualShape(
            pybullet.GEOM_MESH,
            fileName=path,
            meshScale=[scale] * 3,
            rgbaColor=colour,
            visualFramePosition=(-centre * scale).tolist(),
        )
        collision = client.createCollisionShape(
            pybullet.GEOM_BOX, halfExtents=(extent * scale / 2).tolist()
        )
        return client.createMultiBody(0.2, collision, visual)

    def _add_distractor(self, rng: np.random.Generator) -> int:
        index = int(rng.integers(_DISTRACTOR_FILES))
        path = os.path.join(self._data, "random_urdfs", f"{index:03d}", f"{index:03d}.obj")
        size = rng.uniform(0.05, 0.09)
        colour = [*rng.uniform(0.05, 1.0, 3).tolist(), 1.0]
        body = self._add_mesh(path, size, colour)
        radius = rng.uniform(*self.config.distractor_ring)
        azimuth = self._free_azimuth(rng)
        orientation = self._client.getQuaternionFromEuler(rng.uniform(-math.pi, math.pi, 3))
        position = [radius * math.cos(azimuth), radius * math.sin(azimuth), size / 2 + 0.01]
        self._client.resetBasePositionAndOrientation(body, position, orientation)
        return body

    # -- keeping the central object visible

    def _wedge_half_width(self) -> float:
        """Half-width (rad) of the no-distractor wedge around each camera's line of sight."""
        return min(math.radians(25.0), 0.4 * math.pi / self.config.num_cameras)

    def _in_wedge(self, azimuth: float) -> bool:
        half = self._wedge_half_width()
        for cam in self.config.cameras:
            gap = (azimuth - math.radians(cam.azimuth_deg) + math.pi) % (2 * math.pi) - math.pi
            if abs(gap) < half:
                return True
        return False

    def _free_azimuth(self, rng: np.random.Generator) -> float:
        for _ in range(100):
            azimuth = rng.uniform(-math.pi, math.pi)
            if not self._in_wedge(azimuth):
                return azimuth
        raise ConfigError("no room for distractors: too many cameras for the no-occlusion wedges")

    # -- motion

    def advance(self) -> None:
        """Move the scene on by one frame (1/fps seconds)."""
        client, rng = self._client, self._rng
        dt = 1.0 / self.config.fps
        position, orientation = client.getBasePositionAndOrientation(self._central)
        turn = client.getQuaternionFromEuler([0.0, 0.0, self._spin * dt])
        _, spun = client.multiplyTransforms([0, 0, 0], turn, [0, 0, 0], orientation)
        client.resetBasePositionAndOrientation(self._central, position, spun)
        client.resetBaseVelocity(self._central, [0, 0, 0], [0, 0, 0])
        for body in self._distractors:
            self._nudge(body, rng)
        self._light = self._light + np.array([*rng.normal(0, 0.03, 2), 0.0])
        self._light[:2] = np.clip(self._light[:2], -1.5, 1.5)
        for _ in range(max(1, round(_PHYSICS_HZ * dt))):
            client.stepSimulation()
        self.time_s += dt

    def _nudge(self, body: int, rng: np.random.Generator) -> None:
        """Random tangential push; pushed back out of the camera wedges and into the ring."""
        (x, y, _z), _ = self._client.getBasePositionAndOrientation(body)
        radius, azimuth = math.hypot(x, y), math.atan2(y, x)
        tangential = rng.normal(0.0, 0.08)
        ahead = azimuth + math.copysign(0.15, tangential)
        if self._in_wedge(ahead):
            tangential = -tangential
        low, high = self.config.distractor_ring
        radial = 0.1 * (low - radius) / 0.05 if radius < low else 0.0
        radial += 0.1 * (high - radius) / 0.05 if radius > high else 0.0
        velocity = [
            radial * math.cos(azimuth) - tangential * math.sin(azimuth),
            radial * math.sin(azimuth) + tangential * math.cos(azimuth),
            0.0,
        ]
        self._client.resetBaseVelocity(body, velocity, rng.normal(0.0, 1.0, 3).tolist())

    # -- rendering

    def render(self, *, visibility: bool = False) -> RenderedFrameSet:
        """Render every camera's view; ``visibility`` also counts the central object's pixels."""
        height, width = self.config.image_size
        flags = 0 if visibility else pybullet.ER_NO_SEGMENTATION_MASK
        views, central_pixels = [], []
        for view_matrix, projection in zip(self._views, self._projections, strict=True):
            _, _, rgba, _, segmentation = self._client.getCameraImage(
                width,
                height,
                view_matrix,
                projection,
                renderer=pybullet.ER_TINY_RENDERER,
                shadow=int(self.config.shadows),
                lightDirection=self._light.tolist(),
                flags=flags,
            )
            rgba = np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)
            views.append(np.ascontiguousarray(rgba[:, :, :3]))
            if visibility:
                mask = np.asarray(segmentation).reshape(height, width)
                central_pixels.append(int((mask == self._central).sum()))
        counts = central_pixels if visibility else None
        return RenderedFrameSet(views, self.label, counts, self.time_s)

    def close(self) -> None:
        """Disconnect the physics server."""
        if self._client is not None:
            self._client.disconnect()
            self._client = None

    def __enter__(self) -> SimRig:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def render_episode(
    rig: SimRig, seed: int, episode: int, frames: int, *, visibility: bool = False
) -> Iterator[RenderedFrameSet]:
    """Yield ``frames`` consecutive frame sets of one episode (a pure function of its inputs)."""
    rig.reset(seed, episode)
    for frame in range(frames):
        if frame:
            rig.advance()
        yield rig.render(visibility=visibility)


# ---------------------------------------------------------------- rendering a dataset


@dataclass(frozen=True)
class RenderJob:
    """A dataset to render: ``frames`` frame sets, episodes of ``rig.frames_per_episode``."""

    out: Path
    frames: int
    rig: RigConfig = field(default_factory=RigConfig)
    seed: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ConfigError(f"frames must be >= 1, got {self.frames}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")

    @property
    def camera_names(self) -> list[str]:
        """Folder names of the cameras: cam0, cam1, ..."""
        return [f"cam{v}" for v in range(self.rig.num_cameras)]

    @property
    def stem_width(self) -> int:
        """Digits in a stem: 6, or more for datasets of a million frame sets or more."""
        return max(6, len(str(self.frames - 1)))

    def episodes(self) -> list[tuple[int, int]]:
        """(episode, number of frames) covering frame sets 0..frames-1 in order."""
        per = self.rig.frames_per_episode
        count = math.ceil(self.frames / per)
        return [(e, min(per, self.frames - e * per)) for e in range(count)]


_worker_rig: SimRig | None = None


def _init_worker(config: RigConfig) -> None:
    global _worker_rig
    _worker_rig = SimRig(config)


def _render_episode_to_disk(job: RenderJob, episode: int, frames: int) -> dict[str, int]:
    """Render one episode into job.out; returns its labels (runs in a worker process)."""
    assert _worker_rig is not None, "worker not initialised"
    writer = FrameSetWriter(job.out, job.camera_names, exist_ok=True, write_labels=False)
    first = episode * job.rig.frames_per_episode
    for offset, frame_set in enumerate(render_episode(_worker_rig, job.seed, episode, frames)):
        writer.write(f"{first + offset:0{job.stem_width}d}", frame_set.views, frame_set.label)
    return writer.labels


def render_dataset(job: RenderJob, progress: Callable[[int], None] | None = None) -> Path:
    """Render a labelled dataset in the folder format; identical for a seed at any worker count.

    Workers are spawned processes: a script that calls this with ``workers > 1`` needs the
    usual ``if __name__ == "__main__":`` guard (the ``mvld-data`` command has it).
    """
    FrameSetWriter(job.out, job.camera_names).close()  # creates the folders, refuses a full one
    labels: dict[str, int] = {}
    tasks = job.episodes()
    if job.workers == 1:
        _init_worker(job.rig)
        results = (_render_episode_to_disk(job, e, n) for e, n in tasks)
        for (_, frames), episode_labels in zip(tasks, results, strict=True):
            labels.update(episode_labels)
            if progress:
                progress(frames)
    else:
        context = multiprocessing.get_context("spawn")  # no inherited pybullet state
        with context.Pool(job.workers, initializer=_init_worker, initargs=(job.rig,)) as pool:
            calls = [pool.apply_async(_render_episode_to_disk, (job, e, n)) for e, n in tasks]
            for (_, frames), call in zip(tasks, calls, strict=True):
                labels.update(call.get())
                if progress:
                    progress(frames)
    write_labels(job.out, labels)
    (job.out / "render.json").write_text(json.dumps(describe_job(job), indent=2))
    return job.out


def describe_job(job: RenderJob) -> dict:
    """The resolved render config plus camera calibration and label names, for render.json."""
    height, width = job.rig.image_size
    return {
        "generator": "mvld-data render",
        "frames": job.frames,
        "seed": job.seed,
        "rig": asdict(job.rig),
        "label": "class of the object nearest the table centre",
        "classes": list(SHAPE_CLASSES),
        "cameras": {
            name: {
                "K": cam.intrinsics(height, width).tolist(),
                "world_to_camera": cam.world_to_camera(job.rig.target).tolist(),
            }
            for name, cam in zip(job.camera_names, job.rig.cameras, strict=True)
        },
    }
