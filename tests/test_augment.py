"""Classifier augmentation: each transform does what it says, and draws are seeded."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from mvld.train.augment import (
    AugmentConfig,
    augment_for_dataset,
    augment_views,
    gaussian_blur,
    mirror_invariant,
)

NONE = AugmentConfig(flip_prob=0.0, max_shift=0, brightness=0.0, contrast=0.0, blur_prob=0.0)


def _views(count: int = 6, size: int = 16) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_no_transform_is_the_identity() -> None:
    views = _views()
    torch.testing.assert_close(
        augment_views(views, NONE, torch.Generator().manual_seed(1)), views, rtol=0, atol=0
    )


def test_flip_mirrors_every_view_when_certain() -> None:
    views = _views()
    config = AugmentConfig(**{**NONE.__dict__, "flip_prob": 1.0})
    flipped = augment_views(views, config, torch.Generator().manual_seed(1))
    torch.testing.assert_close(flipped, views.flip(-1), rtol=0, atol=0)


def test_shift_moves_each_view_within_the_bound() -> None:
    views, pad = _views(), 2
    config = AugmentConfig(**{**NONE.__dict__, "max_shift": pad})
    shifted = augment_views(views, config, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(views, (pad,) * 4, mode="reflect")
    offsets = set()
    for n in range(len(views)):
        matches = [
            (dy, dx)
            for dy, dx in itertools.product(range(2 * pad + 1), repeat=2)
            if torch.equal(padded[n, :, dy : dy + 16, dx : dx + 16], shifted[n])
        ]
        assert matches, f"view {n} is not a shift of the input"
        offsets.add(matches[0])
    assert len(offsets) > 1  # the shift is drawn per view


def test_blur_with_sigma_zero_is_the_identity_and_larger_sigma_smooths_more() -> None:
    views = _views(3)
    torch.testing.assert_close(gaussian_blur(views, torch.zeros(3)), views, rtol=0, atol=1e-6)
    blurred = gaussian_blur(views[:1].expand(3, -1, -1, -1), torch.tensor([0.5, 1.0, 2.0]))
    spread = blurred.std(dim=(1, 2, 3))
    assert spread[0] > spread[1] > spread[2]
    # A blur keeps the mean brightness (normalised taps, reflect padding).
    assert blurred.mean(dim=(1, 2, 3)) == pytest.approx(views[0].mean().item(), abs=0.02)


def test_augmentation_is_a_function_of_the_generator_and_stays_in_range() -> None:
    views, config = _views(), AugmentConfig()
    first = augment_views(views, config, torch.Generator().manual_seed(7))
    again = augment_views(views, config, torch.Generator().manual_seed(7))
    other = augment_views(views, config, torch.Generator().manual_seed(8))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    assert first.min() >= -1.0 and first.max() <= 1.0


def test_default_augmentation_never_mirrors() -> None:
    views = _views(64)
    config = AugmentConfig(
        **{
            **AugmentConfig().__dict__,
            "max_shift": 0,
            "blur_prob": 0.0,
            "brightness": 0.0,
            "contrast": 0.0,
        }
    )
    out = augment_views(views, config, torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, views, rtol=0, atol=0)


def test_mirroring_is_chosen_per_dataset(tmp_path: Path) -> None:
    plain, declared, rendered, refused = (tmp_path / n for n in ("a", "b", "c", "d"))
    for folder in (plain, declared, rendered, refused):
        folder.mkdir()
    (declared / "dataset.json").write_text(json.dumps({"mirror_invariant": True}))
    (rendered / "render.json").write_text(json.dumps({"classes": ["duck", "box"]}))
    (refused / "render.json").write_text(json.dumps({"classes": ["duck", "box"]}))
    (refused / "dataset.json").write_text(json.dumps({"mirror_invariant": False}))
    assert [mirror_invariant(f) for f in (plain, declared, rendered, refused)] == [
        False,
        True,
        True,
        False,
    ]
    assert augment_for_dataset(plain, mirror=False).flip_prob == 0.0
    assert augment_for_dataset(plain, mirror=True).flip_prob > 0.0  # asked for
    assert augment_for_dataset(declared, mirror=False).flip_prob > 0.0
    (plain / "dataset.json").write_text("{broken")
    assert not mirror_invariant(plain)
