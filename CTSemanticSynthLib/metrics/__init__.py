"""Image metrics (PSNR, SSIM), Dice per organ, FID/KID from Inception features (per plane for volumes), and the
stripe index (slice-to-slice consistency).

Inception is loaded only when :class:`InceptionFeatures` is constructed; nothing here touches the network.
"""

from .consistency import plane_fid_gap, slice_ratio, stripe_index
from .dice import dice, dice_per_organ, mean_dice, voxel_counts
from .fid import FeatureStats, fid, frechet_distance, kid
from .image import SLICE_SIZE, axial_unit_slices, psnr, ssim, summarize, to_model_slices
from .inception import InceptionFeatures, inception_input, inception_search_paths, resolve_inception_path
from .planes import PLANES, per_plane_fid, plane_slices

__all__ = [
    "PLANES",
    "SLICE_SIZE",
    "FeatureStats",
    "InceptionFeatures",
    "axial_unit_slices",
    "dice",
    "dice_per_organ",
    "fid",
    "frechet_distance",
    "inception_input",
    "inception_search_paths",
    "kid",
    "mean_dice",
    "per_plane_fid",
    "plane_fid_gap",
    "plane_slices",
    "psnr",
    "resolve_inception_path",
    "slice_ratio",
    "ssim",
    "stripe_index",
    "summarize",
    "to_model_slices",
    "voxel_counts",
]
