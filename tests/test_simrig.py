"""The simulated rig: determinism, motion, visibility of the labelled object, calibration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mvld.common.errors import ConfigError
from mvld.sim.rig import (
    SHAPE_CLASSES,
    CameraSpec,
    RigConfig,
    SimRig,
    render_episode,
    ring_of_cameras,
)


@pytest.fixture(scope="module")
def rig() -> SimRig:
    with SimRig() as shared:
        yield shared


def test_episode_is_a_pure_function_of_seed_and_episode(rig: SimRig) -> None:
    first = list(render_episode(rig, 7, 3, 4))
    list(render_episode(rig, 7, 9, 2))  # another episode in between leaves no trace
    with SimRig() as other:
        second = list(render_episode(other, 7, 3, 4))
    for a, b in zip(first, second, strict=True):
        assert a.label == b.label
        for view_a, view_b in zip(a.views, b.views, strict=True):
            np.testing.assert_array_equal(view_a, view_b)
    different = next(render_episode(rig, 8, 3, 1))
    assert any(
        not np.array_equal(x, y) for x, y in zip(different.views, first[0].views, strict=True)
    )


def test_views_are_rgb_images_of_the_configured_size(rig: SimRig) -> None:
    frame_set = next(render_episode(rig, 0, 0, 1))
    assert len(frame_set.views) == 3
    for view in frame_set.views:
        assert view.shape == (64, 64, 3) and view.dtype == np.uint8
        assert view.std() > 10  # a scene, not a blank image
    with SimRig(RigConfig(cameras=ring_of_cameras(2), image_size=(128, 128))) as big:
        views = next(render_episode(big, 0, 0, 1)).views
    assert len(views) == 2 and views[0].shape == (128, 128, 3)


def test_consecutive_frames_differ_and_the_scene_moves(rig: SimRig) -> None:
    frames = list(render_episode(rig, 1, 0, 6))
    for previous, current in itertools.pairwise(frames):
        assert current.label == previous.label
        changed = [
            np.abs(a.astype(int) - b).sum()
            for a, b in zip(previous.views, current.views, strict=True)
        ]
        assert min(changed) > 0, "every camera sees the scene move"
    assert frames[-1].time_s == pytest.approx(5 / rig.config.fps)


def test_central_object_visible_in_every_view_and_all_classes_occur(rig: SimRig) -> None:
    labels = []
    for episode in range(36):
        for frame_set in render_episode(rig, 11, episode, 3, visibility=True):
            assert min(frame_set.central_pixels) >= 40, (episode, frame_set.central_pixels)
        labels.append(frame_set.label)
    assert set(labels) == set(range(len(SHAPE_CLASSES)))


def test_label_cannot_be_read_from_a_fixed_pixel(rig: SimRig) -> None:
    """Pick the most label-predictive pixel on 60 scenes; on 30 new ones it is near chance."""
    images, labels = [], []
    for episode in range(90):
        frame_set = next(render_episode(rig, 5, episode, 1))
        images.append(np.stack(frame_set.views) // 64)
        labels.append(frame_set.label)
    pixels = np.stack(images).reshape(len(labels), -1)
    labels = np.array(labels)
    train, test = slice(0, 60), slice(60, None)

    def lookup(column: np.ndarray, rows: slice) -> np.ndarray:
        table = {
            value: np.bincount(labels[train][column[train] == value]).argmax()
            for value in np.unique(column[train])
        }
        fallback = np.bincount(labels[train]).argmax()
        return np.array([table.get(value, fallback) for value in column[rows]])

    train_accuracy = [
        np.mean(lookup(pixels[:, j], train) == labels[train]) for j in range(pixels.shape[1])
    ]
    best = int(np.argmax(train_accuracy))
    test_accuracy = np.mean(lookup(pixels[:, best], test) == labels[test])
    assert test_accuracy < 0.5, f"pixel {best} predicts the label ({test_accuracy:.2f})"


def test_calibration_projects_the_target_to_the_image_centre() -> None:
    camera = CameraSpec(azimuth_deg=70.0, elevation_deg=35.0, distance=0.8, fov_deg=50.0)
    target = (0.1, -0.05, 0.05)
    K = camera.intrinsics(48, 64)  # noqa: N806 - the usual name of the camera matrix
    world_to_camera = camera.world_to_camera(target)
    point = world_to_camera @ np.array([*target, 1.0])
    assert point[2] == pytest.approx(0.8)  # in front, at the camera distance
    u, v, w = K @ point[:3]
    assert (u / w, v / w) == pytest.approx((32.0, 24.0))
    above = world_to_camera @ np.array([target[0], target[1], target[2] + 0.1, 1.0])
    assert (K @ above[:3])[1] / above[2] < 24.0  # up in the world is up in the image


def test_calibration_matches_the_rendered_object_position(rig: SimRig) -> None:
    """The segmentation centroid of the central object lies where K and the pose project it."""
    rig.reset(2, 0)
    height, width = rig.config.image_size
    position, _ = rig._client.getBasePositionAndOrientation(rig._central)
    for v, camera in enumerate(rig.config.cameras):
        _, _, _, _, mask = rig._client.getCameraImage(
            width, height, rig._views[v], rig._projections[v]
        )
        rows, cols = np.nonzero(np.asarray(mask).reshape(height, width) == rig._central)
        point = camera.world_to_camera(rig.config.target) @ np.array([*position, 1.0])
        u, w_v, w = camera.intrinsics(height, width) @ point[:3]
        assert abs(u / w - cols.mean()) < 4 and abs(w_v / w - rows.mean()) < 4


def test_bad_configs_are_rejected() -> None:
    with pytest.raises(ConfigError):
        RigConfig(image_size=(4, 64))
    with pytest.raises(ConfigError):
        RigConfig(fps=0)
    with pytest.raises(ConfigError):
        ring_of_cameras(0)
    with pytest.raises(ConfigError):
        RigConfig(distractors=(3, 1))
