"""A tiny random-weight nnU-Net results folder in TotalSegmentator 2.18's layout, for offline end-to-end tests.

``build_tiny_totalseg(root, constant_label=5)`` writes ``root/Dataset297_TotalSegmentator_total_3mm_1559subj/
nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/{plans.json, dataset.json, fold_0/checkpoint_final.pth}``
(the ``--fast`` model) and, with ``full=True``, the five ``total`` part models (Dataset291..295). The network is
a 2-stage PlainConvUNet with a few channels; its segmentation head is zeroed with one bias set, so every voxel gets
``constant_label`` (a TotalSegmentator v2 ``total`` id, or a part-model-local id for the parts): the prediction
is known in advance, so a test can check the whole run, the label mapping and the Dice against hand-computed values.
Set ``TOTALSEG_WEIGHTS_PATH=root`` to use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAST = {297: ("Dataset297_TotalSegmentator_total_3mm_1559subj", "nnUNetTrainer_4000epochs_NoMirroring", 3.0)}
FULL = {
    291: ("Dataset291_TotalSegmentator_part1_organs_1559subj", "nnUNetTrainerNoMirroring", 1.5),
    292: ("Dataset292_TotalSegmentator_part2_vertebrae_1532subj", "nnUNetTrainerNoMirroring", 1.5),
    293: ("Dataset293_TotalSegmentator_part3_cardiac_1559subj", "nnUNetTrainerNoMirroring", 1.5),
    294: ("Dataset294_TotalSegmentator_part4_muscles_1559subj", "nnUNetTrainerNoMirroring", 1.5),
    295: ("Dataset295_TotalSegmentator_part5_ribs_1559subj", "nnUNetTrainerNoMirroring", 1.5),
}
PATCH = [64, 64, 64]


def _arch() -> dict:
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 2,
            "features_per_stage": [4, 8],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [2, 2, 2]],
            "n_conv_per_stage": [1, 1],
            "n_conv_per_stage_decoder": [1],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _plans(name: str, spacing: float) -> dict:
    resample = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": PATCH,
                "median_image_size_in_voxels": [64, 64, 64],
                "spacing": [spacing] * 3,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resample,
                "resampling_fn_seg_kwargs": {**resample, "is_seg": True},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": resample,
                "architecture": _arch(),
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1500.0, "mean": 40.0, "median": 40.0, "min": -1000.0, "percentile_00_5": -1000.0,
                  "percentile_99_5": 1000.0, "std": 300.0}
        },
    }


def _build_one(root: Path, task_id: int, name: str, trainer: str, spacing: float, labels: dict[int, str],
               constant_label: int) -> Path:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    folder = root / name / f"{trainer}__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    plans = _plans(name, spacing)
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{n: i for i, n in sorted(labels.items())}},
               "numTraining": 1, "file_ending": ".nii.gz"}
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    kwargs = dict(plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"])
    kwargs.update(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
    torch.manual_seed(task_id)
    net = PlainConvUNet(input_channels=1, num_classes=len(labels) + 1, **kwargs)
    head = net.decoder.seg_layers[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        if constant_label in labels:
            head.bias[constant_label] = 10.0
    torch.save({"network_weights": net.state_dict(), "trainer_name": trainer,
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": None},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


def build_tiny_totalseg(root: str | Path, *, constant_label: int = 5, full: bool = False) -> Path:
    """Write the tiny ``--fast`` (and with ``full`` the 5-part) ``total`` model folders under ``root``."""
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for task_id, (name, trainer, spacing) in FAST.items():
        _build_one(root, task_id, name, trainer, spacing, class_map["total"], constant_label)
    if full:
        parts = list(class_map_5_parts.values())
        for (task_id, (name, trainer, spacing)), part in zip(FULL.items(), parts):
            label = next((k for k, v in part.items() if v == class_map["total"].get(constant_label)), -1)
            _build_one(root, task_id, name, trainer, spacing, dict(part), label)
    return root
