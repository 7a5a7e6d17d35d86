"""grid.onto_grid, branch by branch (same grid, reorder, crop, resample; image and mask), checked by values."""

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.grid import onto_grid
from CTSemanticSynthLib.io import Volume

RNG = np.random.default_rng(7)
AFFINE = np.array([[0.8, 0, 0, 10.0], [0, 0.9, 0, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])


def _target(shape=(6, 7, 5)) -> Volume:
    return Volume(RNG.normal(size=shape).astype(np.float32), AFFINE)


def _labels(shape=(6, 7, 5)) -> np.ndarray:
    return RNG.choice(np.array([0, 3, 7], np.uint8), size=shape)


def flipped_permuted(volume: Volume) -> Volume:
    """The same voxels with axis 0 reversed and the axes in order (2, 0, 1), as a DICOM series might store them."""
    affine = volume.affine.copy()
    affine[:3, 3] += affine[:3, 0] * (volume.shape[0] - 1)
    affine[:3, 0] *= -1
    return Volume(np.ascontiguousarray(volume.array[::-1].transpose(2, 0, 1)), affine[:, [2, 0, 1, 3]])


def _shifted(affine: np.ndarray, voxels: tuple[float, float, float]) -> np.ndarray:
    """``affine`` with its origin moved by ``voxels`` (in its own voxels)."""
    moved = affine.copy()
    moved[:3, 3] += affine[:3, :3] @ np.asarray(voxels, float)
    return moved


@pytest.mark.parametrize("kind", ["image", "mask"])
def test_same_grid_is_returned_as_it_is(kind):
    target = _target()
    volume = Volume(_labels() if kind == "mask" else target.array.copy(), AFFINE.copy())
    notes: list[str] = []
    out = onto_grid(volume, target, kind, "x", notes.append)
    assert out is volume and notes == []


@pytest.mark.parametrize("kind", ["image", "mask"])
def test_another_axis_order_is_reordered_exactly(kind):
    target = _target()
    source = Volume(_labels() if kind == "mask" else target.array, AFFINE)
    notes: list[str] = []
    out = onto_grid(flipped_permuted(source), target, kind, "--x a.nii", notes.append, resample=False)
    np.testing.assert_array_equal(out.array, source.array)  # label values kept, not made 0/1
    assert out.array.dtype == source.array.dtype and np.array_equal(out.affine, target.affine)
    assert notes == ["--x a.nii: same voxels in another axis order; reordered losslessly"]


@pytest.mark.parametrize("kind", ["image", "mask"])
@pytest.mark.parametrize("reorder", [False, True])
def test_a_larger_grid_holding_the_voxels_is_cropped_exactly(kind, reorder):
    big = Volume(_labels((10, 9, 8)) if kind == "mask" else RNG.normal(size=(10, 9, 8)).astype(np.float32),
                 _shifted(AFFINE, (-2, -1, -3)))
    target = _target()  # voxels 2..7, 1..7, 3..7 of the big grid
    given = flipped_permuted(big) if reorder else big
    notes: list[str] = []
    out = onto_grid(given, target, kind, "--keep-ct big.nii", notes.append, resample=False)
    np.testing.assert_array_equal(out.array, big.array[2:8, 1:8, 3:8])
    order = " in another axis order; reordered and" if reorder else ";"
    assert notes == [f"--keep-ct big.nii: a larger grid holding the segmentation's voxels{order} cropped losslessly "
                     "to the segmentation's grid (29% of its voxels kept)"]
    assert "same voxels in another axis order" not in notes[0]


def _resample_case(kind: str) -> tuple[Volume, Volume, np.ndarray]:
    """(volume with twice the voxel size, shifted by a fraction of a voxel, target, each target voxel's index in the
    volume)."""
    coarse = AFFINE @ np.diag([2.0, 2.0, 2.0, 1.0])
    coarse = _shifted(coarse, (-0.35, -0.2, -0.15))
    shape = (5, 6, 4)
    array = _labels(shape) if kind == "mask" else RNG.normal(size=shape).astype(np.float32) * 100
    target = _target((10, 13, 9))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in target.shape], indexing="ij"), axis=-1)
    homogeneous = np.concatenate([grid, np.ones((*target.shape, 1))], axis=-1)
    index = (homogeneous @ np.linalg.solve(coarse, target.affine).T)[..., :3]
    return Volume(array, coarse), target, index


def test_another_grid_is_resampled_linearly_for_an_image():
    volume, target, index = _resample_case("image")
    notes: list[str] = []
    out = onto_grid(volume, target, "image", "--reference-ct r.nii", notes.append)
    inside = np.all((index >= 0) & (index <= np.array(volume.shape) - 1), axis=-1)
    expected = map_coordinates(volume.array, index[inside].T, order=1)  # trilinear, an independent implementation
    np.testing.assert_allclose(out.array[inside], expected, rtol=1e-5, atol=1e-3)
    outside = np.any((index < -0.5) | (index > np.array(volume.shape) - 0.5), axis=-1)
    assert outside.any() and (out.array[outside] == -1000).all()  # not covered: air
    covered = 100 * (~outside).mean()
    assert out.array.dtype == np.float32 and np.array_equal(out.affine, target.affine)
    assert notes[0].startswith("--reference-ct r.nii is on another grid (") and \
        notes[0].endswith(f"resampled (linear) onto the segmentation's grid, covering {covered:.0f}% of it")


def test_another_grid_is_resampled_nearest_for_a_mask():
    volume, target, index = _resample_case("mask")
    notes: list[str] = []
    out = onto_grid(volume, target, "mask", "--body-mask b.nii", notes.append)
    outside = np.any((index < -0.5) | (index > np.array(volume.shape) - 0.5), axis=-1)
    nearest = np.clip(np.round(index).astype(int), 0, np.array(volume.shape) - 1)
    expected = (volume.array[tuple(nearest[~outside].T)] != 0).astype(np.uint8)  # nonzero labels -> 1
    np.testing.assert_array_equal(out.array[~outside], expected)
    assert (out.array[outside] == 0).all() and set(np.unique(out.array)) == {0, 1}
    assert "resampled (nearest-neighbour)" in notes[0]


def test_a_partly_covering_aligned_grid_is_resampled_not_reordered():
    """Same voxel size and whole-voxel offset, but the volume covers only part of the target: resampled, where
    linear interpolation at voxel centres gives the values exactly, and the rest is air."""
    target = _target()
    part = Volume(target.array[2:, :, 1:].copy(), _shifted(AFFINE, (2, 0, 1)))
    notes: list[str] = []
    out = onto_grid(part, target, "image", "ct", notes.append)
    np.testing.assert_allclose(out.array[2:, :, 1:], target.array[2:, :, 1:], atol=1e-5)
    assert (out.array[:2] == -1000).all() and (out.array[:, :, :1] == -1000).all()
    assert "covering 53% of it" in notes[0]
    with pytest.raises(InputError, match="^ct is on another grid than the segmentation .* would need resampling"):
        onto_grid(part, target, "image", "ct", resample=False)
    short = onto_grid(Volume(target.array[:-1].copy(), AFFINE), target, "image", "ct")  # one slice short at the end
    np.testing.assert_allclose(short.array[:-1], target.array[:-1], atol=1e-5)
    assert (short.array[-1] == -1000).all()


@pytest.mark.parametrize("kind", ["image", "mask"])
def test_no_overlap_is_refused(kind):
    target = _target()
    with pytest.raises(InputError, match="^m does not overlap the segmentation"):
        onto_grid(Volume(target.array, _shifted(AFFINE, (100, 0, 0))), target, kind, "m")
