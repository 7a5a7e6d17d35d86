"""Window, orientation to the axial slice stack, model-size resizing, body masks and edge maps."""

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from CTSemanticSynthLib.intensity import FULL_RANGE
from CTSemanticSynthLib.labels import BODY
from CTSemanticSynthLib.preprocess import (
    AxialOrientation,
    PlaneResize,
    add_body_class,
    body_mask_from_ct,
    body_mask_from_labels,
    condition_inputs,
    drop_condition,
    hu_from_model,
    hu_to_model,
    hu_to_unit,
    one_hot,
    semantic_edges,
    unit_to_hu,
)


def test_window_and_exact_inverse():
    hu = np.array([-1000, -160, -60, 40, 240, 3000], dtype=np.float32)
    unit = hu_to_unit(hu)
    np.testing.assert_allclose(unit, [0, 0, 0.25, 0.5, 1, 1])
    inside = np.linspace(-160, 240, 101, dtype=np.float32)
    np.testing.assert_allclose(unit_to_hu(hu_to_unit(inside)), inside, atol=1e-4)
    np.testing.assert_array_equal(unit_to_hu(np.array([-0.5, 1.5])), [-160, 240])  # clipped to the window first
    assert hu_to_unit(hu.astype(np.int16)).dtype == np.float32  # float32 for any input: volumes are large
    assert unit_to_hu(np.array([0.5])).dtype == np.float32



def test_images_are_resized_in_hu_so_a_coarse_pixel_holds_the_mean_attenuation():
    """A 2-voxel cortical bar (1500 HU) and a gas pocket in soft tissue, on a non-square slice: the model-size slice
    holds the HU mean of what each pixel covers (resized after the full-range companding, the bar's neighbourhood
    would come out 100s of HU low), the padding is the range's lowest HU (air), and a flat slice comes back as it
    was away from the padding."""
    hu = np.full((1, 90, 60), 40.0, np.float32)
    hu[0, 30:60, 29:31] = 1500.0
    hu[0, 70:80, 10:12] = -1000.0
    hu[0, 0, 0] = 2500.0  # metal: clipped to the range first
    resize = PlaneResize(90, 60, 30)  # 3x coarser, 5 pixels of padding left and right
    low = hu_to_model(resize, torch.from_numpy(hu), FULL_RANGE.hu_range)[0].numpy()
    np.testing.assert_allclose(low[:, :4], -1024.0, atol=0.5)
    clipped = np.clip(hu[0], -1024, 2000)
    assert low[8:22, 12:18].mean() == pytest.approx(clipped[24:66, 21:39].mean(), abs=2.0)  # around the bar
    assert low[21:29, 6:11].mean() == pytest.approx(clipped[63:87, 3:18].mean(), abs=2.0)  # around the gas
    assert low[8:22, 14:16].max() > 500  # a pixel half bone is far brighter than soft tissue
    flat = torch.full((2, 90, 60), -300.0)
    back = hu_from_model(resize, hu_to_model(resize, flat, FULL_RANGE.hu_range), FULL_RANGE.hu_range)
    assert back.shape == (2, 90, 60)
    np.testing.assert_allclose(back[:, :, 6:-6].numpy(), -300.0, atol=0.1)  # the edges mix with the padding's air
    spread = hu_from_model(resize, torch.from_numpy(low[None]), FULL_RANGE.hu_range).numpy()
    assert spread.min() >= -1024 and spread.max() <= 2000
    assert spread[0, 24:66, 21:39].mean() == pytest.approx(clipped[24:66, 21:39].mean(), abs=3.0)


def _affine(perm, signs, spacing=(1.0, 2.0, 3.0)):
    a = np.zeros((4, 4))
    for vox, (ras, sign) in enumerate(zip(perm, signs)):
        a[ras, vox] = sign * spacing[vox]
    a[3, 3] = 1
    return a


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("signs", [(1, 1, 1), (-1, -1, 1), (1, -1, -1), (-1, 1, -1)])
def test_stack_is_display_oriented_for_every_axis_order(perm, signs):
    affine = _affine(perm, signs)
    shape = (5, 6, 7)
    vol = np.arange(np.prod(shape)).reshape(shape)
    o = AxialOrientation.from_affine(affine)
    stack = o.to_stack(vol)
    np.testing.assert_array_equal(o.from_stack(stack), vol)

    def ras(index):
        return (affine @ np.array([*index, 1.0]))[:3]

    def voxel_of(stack_index):
        flat = int(stack[stack_index])
        return np.unravel_index(flat, shape)

    origin = ras(voxel_of((0, 0, 0)))
    assert ras(voxel_of((1, 0, 0)))[2] > origin[2]  # slices go superior
    assert ras(voxel_of((0, 1, 0)))[1] < origin[1]  # rows go posterior
    assert ras(voxel_of((0, 0, 1)))[0] < origin[0]  # columns go to the patient's left


def test_oblique_affine_picks_nearest_axes():
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 0.8, 2.5])
    o = AxialOrientation.from_affine(affine)
    assert o.axes == (2, 1, 0) and o.flips == (False, True, True)


def test_oblique_choice_ignores_voxel_size():
    # the nearest axes depend on the directions only: anisotropic spacing must not pull an axis over
    rng = np.random.default_rng(0)
    for _ in range(200):
        rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        affine, scaled = np.eye(4), np.eye(4)
        affine[:3, :3] = rotation
        scaled[:3, :3] = rotation @ np.diag(rng.uniform(0.3, 5.0, 3))
        assert AxialOrientation.from_affine(scaled) == AxialOrientation.from_affine(affine)


@pytest.mark.parametrize("height, width", [(6, 10), (10, 6)])
def test_plane_resize_pads_to_square_and_inverts(height, width):
    resize = PlaneResize(height=height, width=width, size=10)
    assert resize.padding == ((2, 2, 0, 0) if height < width else (0, 0, 2, 2))
    labels = torch.randint(0, 17, (3, height, width))
    small = resize.to_model(labels, labels=True)
    assert small.shape == (3, 10, 10) and small.dtype == labels.dtype
    padded = small if height < width else small.transpose(1, 2)
    assert (padded[:, :2] == 0).all() and (padded[:, -2:] == 0).all()
    torch.testing.assert_close(resize.from_model(small, labels=True), labels)
    image = torch.rand(3, height, width)
    torch.testing.assert_close(resize.from_model(resize.to_model(image, labels=False), labels=False), image)


def test_label_resize_never_invents_values_and_is_centred():
    labels = torch.zeros(1, 80, 101, dtype=torch.int64)  # left-right symmetric
    labels[0, 20:60, 30:71] = 6
    labels[0, 40:45, 45:56] = 13
    resize = PlaneResize(80, 101, 64)
    small = resize.to_model(labels, labels=True)
    assert set(small.unique().tolist()) == {0, 6, 13}
    back = resize.from_model(small, labels=True)
    assert back.shape == labels.shape
    assert (back == labels).float().mean() > 0.98
    # symmetric through the model size and back: no half-pixel shift
    assert torch.equal(small, small.flip(-1)) and torch.equal(back, back.flip(-1))
    image = torch.rand(2, 80, 101)
    down_up = resize.from_model(resize.to_model(image.clone(), labels=False), labels=False)
    assert down_up.shape == image.shape and 0 <= down_up.min() and down_up.max() <= 1


@pytest.mark.parametrize("n_in, n_out", [(64, 16), (16, 64), (40, 64)])
@pytest.mark.parametrize("direction", ["to_model", "from_model"])
def test_image_resize_keeps_pixel_centres_and_averages_when_shrinking(direction, n_in, n_out):
    def resize(image: torch.Tensor) -> torch.Tensor:
        if direction == "to_model":
            return PlaneResize(n_in, n_in, n_out).to_model(image, labels=False)
        return PlaneResize(n_out, n_out, n_in).from_model(image, labels=False)

    # a ramp (value = column) resized is the ramp at the output pixel centres: same field of view, no shift
    ramp = torch.arange(float(n_in)).repeat(n_in, 1)[None]
    centres = (torch.arange(n_out) + 0.5) * n_in / n_out - 0.5
    inner = (centres > 3) & (centres < n_in - 4)  # away from the border, where the filter is cut off
    torch.testing.assert_close(resize(ramp)[0, n_out // 2, inner], centres[inner])
    if n_in > n_out:  # shrinking averages every input pixel (antialiasing): noise drops, it does not alias
        noise = torch.rand(1, n_in, n_in, generator=torch.Generator().manual_seed(0))
        assert resize(noise).std() < 0.08  # uniform noise: 0.29; bilinear without antialiasing: 0.14


def test_body_mask_from_ct_drops_table_and_fills_holes():
    hu = np.full((2, 40, 40), -1000.0)
    yy, xx = np.mgrid[:40, :40]
    body = (yy - 18) ** 2 + (xx - 20) ** 2 < 12 ** 2
    hu[:, body] = 30
    hu[:, (yy - 18) ** 2 + (xx - 20) ** 2 < 3 ** 2] = -900  # air in the bowel: a hole
    hu[:, 36, 5:35] = 200  # thin table line below the patient
    mask = body_mask_from_ct(hu)
    assert (mask[:, body]).all()
    assert not mask[:, 36].any()
    assert mask.sum() == 2 * body.sum()


def test_body_mask_from_ct_cuts_a_thin_table_off_and_keeps_an_arm():
    # the opening removes a 4-pixel table touching the body but keeps a 6-pixel-thick arm
    hu = np.full((1, 48, 48), -1000.0)
    yy, xx = np.mgrid[:48, :48]
    body = (yy - 20) ** 2 + (xx - 20) ** 2 < 12 ** 2
    arm = (yy >= 17) & (yy < 23) & (xx >= 30) & (xx < 46)
    hu[:, body | arm] = 30
    hu[:, 32:36, 2:46] = 200  # rows 32..35, the body's lowest row is 31
    mask = body_mask_from_ct(hu)[0]
    assert mask[body].all() and mask[arm].mean() > 0.9
    assert mask[32:36].mean() < 0.3  # only the corner where table and body meet stays


def test_empty_stack_gives_empty_masks():
    assert body_mask_from_ct(np.zeros((0, 8, 8))).shape == (0, 8, 8)
    assert body_mask_from_labels(np.zeros((0, 8, 8), dtype=np.uint8), has_outline=False).shape == (0, 8, 8)


@pytest.mark.parametrize("others", [1, 2])
def test_body_mask_from_ct_keeps_only_the_largest_component(others: int) -> None:
    # thick objects beside the patient (a head rest, a second limb) survive the opening: only the body stays
    hu = np.full((1, 48, 48), -1000.0)
    yy, xx = np.mgrid[:48, :48]
    body = (yy - 20) ** 2 + (xx - 20) ** 2 < 12 ** 2
    hu[:, body] = 30
    hu[:, 40:46, 30:40] = 100
    if others == 2:
        hu[:, 2:8, 38:46] = 100
    mask = body_mask_from_ct(hu)
    assert mask[0, body].all()
    assert mask.sum() == body.sum()


def test_body_mask_from_labels_outline_and_hull():
    labels = np.zeros((1, 30, 30), dtype=np.int32)
    labels[0, 5:25, 5:25] = 3  # body outline label
    labels[0, 10:12, 10:12] = 1
    labels[0, 12:14, 12:14] = 0  # a hole inside the outline
    exact = body_mask_from_labels(labels, has_outline=True)
    assert exact[0, 5:25, 5:25].all() and exact.sum() == 400
    organs = np.zeros((1, 30, 30), dtype=np.int32)
    organs[0, 10, 10] = organs[0, 10, 20] = organs[0, 20, 15] = 1
    hull = body_mask_from_labels(organs, has_outline=False)
    assert hull[0, 13, 15] and not hull[0, 25, 25]
    assert hull[0, 10, 15] and not hull[0, 9, 15]  # by default the exact hull: the top edge is row 10
    one = body_mask_from_labels(organs, has_outline=False, margin_px=1)
    assert one[0, 9, 15] and not one[0, 8, 15]
    grown = body_mask_from_labels(organs, has_outline=False, margin_px=3)
    assert grown.sum() > one.sum() and grown[0, 23, 15]


@pytest.mark.parametrize("margin", [0, 2])
def test_body_mask_from_labels_without_a_hull(margin: int):
    # two organ pixels, or three in a line, span no area: they stay the body (grown by the margin)
    for points in ([(3, 3), (6, 9)], [(2, 2), (4, 4), (6, 6)]):
        organs = np.zeros((1, 12, 12), dtype=np.int32)
        organs[0][tuple(np.transpose(points))] = 5
        expected = ndimage.binary_dilation(organs[0] > 0, iterations=margin) if margin else organs[0] > 0
        np.testing.assert_array_equal(body_mask_from_labels(organs, has_outline=False, margin_px=margin)[0],
                                      expected)


def test_add_body_class_keeps_organs():
    classes = np.array([[0, 6, 0, 1]], dtype=np.uint8)
    body = np.array([[True, True, False, True]])
    assert add_body_class(classes, body).tolist() == [[BODY, 6, 0, 1]]


def test_one_hot_and_edges():
    classes = torch.zeros(1, 6, 6, dtype=torch.int64)
    classes[0, 2:4, 2:4] = 6
    oh = one_hot(classes)
    assert oh.shape == (1, 17, 6, 6) and torch.equal(oh.sum(1), torch.ones(1, 6, 6))
    edges = semantic_edges(classes)
    assert edges.shape == (1, 1, 6, 6)
    expected = torch.zeros(6, 6)
    expected[2:4, 1:5] = 1
    expected[1:5, 2:4] = 1
    torch.testing.assert_close(edges[0, 0], expected)


@pytest.mark.parametrize("conditioning", ["concat", "mask_encoder", "edge"])
def test_condition_inputs_per_conditioning(conditioning):
    classes = torch.zeros(2, 6, 6, dtype=torch.int64)
    classes[:, 1:4, 2:5] = 9
    inputs = condition_inputs(classes, conditioning)
    expected = {"mask": one_hot(classes)}
    if conditioning == "edge":
        expected["edge"] = semantic_edges(classes)
    assert inputs.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(inputs[key], value)


def test_condition_inputs_of_a_slice_and_its_neighbours():
    """(N, 1 + 2k, H, W) classes (2.5D): the one-hot masks side by side, slice first; edges of the slice only."""
    classes = torch.randint(0, 17, (2, 3, 6, 6), generator=torch.Generator().manual_seed(0))
    inputs = condition_inputs(classes, "edge")
    torch.testing.assert_close(inputs["mask"], torch.cat([one_hot(classes[:, j]) for j in range(3)], dim=1))
    torch.testing.assert_close(inputs["edge"], semantic_edges(classes[:, 0]))


def test_drop_condition_zeroes_the_dropped_samples_only():
    classes = torch.randint(1, 17, (3, 6, 6), generator=torch.Generator().manual_seed(1))
    inputs = condition_inputs(classes, "edge")
    dropped = drop_condition(inputs, torch.tensor([True, False, True]))
    assert dropped.keys() == inputs.keys()
    for key, value in inputs.items():
        assert dropped[key].dtype == value.dtype and value[1].any()
        torch.testing.assert_close(dropped[key][[0, 2]], value[[0, 2]])
        assert not dropped[key][1].any()
