"""Segmentation volume in, synthetic CT volume (HU, int16, same grid) out: batched slice-wise diffusion sampling.

Only slices that contain body or organs are sampled; background voxels are air (-1000 HU). Samples live in the
model's intensity mapping (:mod:`.intensity`: the paper's -160..240 HU window or a full range) and are resized back
to the segmentation's grid, the class boundaries optionally restored (:mod:`.partial_volume`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from .checkpoint import LoadedModel
from .denoiser import AUTO, FIXED_AUTO_BATCH, VolumeDenoiser, precision_autocast, to_memory_format
from .device import device_capability, select_device, select_precision
from .diffusion import SAMPLERS, GaussianDiffusion, Sampler, make_sampler, sample_loop
from .diffusion.samplers.repaint import Inpainting, Jumps, repaint_loop
from .diffusion.slice_agreement import SliceAgreement
from .diffusion.slice_noise import SliceNoise
from .errors import Cancelled, CTSynthError, InputError
from .factory import create_diffusion
from .io import Volume
from .intensity import PAPER_WINDOW, IntensityMapping
from .labels import BACKGROUND, PAPER, ClassSet, MappingReport, resolve_adapter
from .partial_volume import ClassValues, restore_boundaries
from .preprocess import (
    AIR_HU,
    BODY_THRESHOLD_HU,
    AxialOrientation,
    PlaneResize,
    add_body_class,
    body_mask_from_ct,
    body_mask_from_labels,
    condition_inputs,
    hu_from_model,
    hu_to_model,
    network_classes,
    one_hot,
)
from .provenance import provenance_record
from .regenerate import DEFAULT_JUMP_N_SAMPLE, RegionEdit
from .slice_context import network_context, with_neighbours

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, int], None]
"""Called with (slices done, may be fractional; slices to sample)."""

BODY_MARGIN_MM = 30.0
"""Margin around the labelled structures that stands in for unlabelled subcutaneous fat when no body outline is
given (best Dice, 0.94, against the CT-derived body on the bundled example)."""
BODY_BRIDGE_MM = 15.0
"""Labelled structures closer than twice this share one convex hull when the body is built from the labels (the
trunk's organs, bones and muscles); farther ones (a limb beside the trunk) keep hulls of their own."""


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample. ``start_timestep`` < T-1 starts from the noised class-mean prior (SDEdit); ``guidance`` s != 0 is
    classifier-free guidance (models trained with label dropout). ``batch_size``: slices the network evaluates
    together, or "auto" (measured from free GPU memory, see :meth:`~.denoiser.VolumeDenoiser.measured_batch_size`).
    ``compile``: torch.compile the network (pays on CUDA, not on the CPU: see docs/benchmarks.md). ``precision`` is
    the network's arithmetic (fp32, bf16, fp16, or auto: see :func:`select_precision`; the CLI defaults to auto, the
    library to fp32, which gives the same volume on every CPU); the sampler's own arithmetic stays float32, and the
    provenance records the resolved value. ``boundary_correction``: restore the class boundaries that the model's
    coarser slice grid blurs, from the class volume (:mod:`.partial_volume`)."""

    sampler: str = "ddim"
    steps: int = 50
    start_timestep: int | None = None
    eta: float = 0.0
    seed: int = 0
    batch_size: int | str = 8
    slice_correlation: float = 0.0
    guidance: float = 0.0
    slice_agreement: float = 0.0
    slice_agreement_below: float = 1.0
    compile: bool = False
    precision: str = "fp32"
    boundary_correction: bool = False


NEUTRAL_OPTIONS = {"slice_correlation": 0.0, "guidance": 0.0, "slice_agreement": 0.0, "slice_agreement_below": 1.0}
"""The sampling refinements at their 'off' values."""


def used_options(options: SamplingOptions, kind: str) -> SamplingOptions:
    """The options a model of ``kind`` samples with, as its provenance records them: a one-pass generator uses only
    the seed, the batch size and the precision (no sampler, one step, every refinement off)."""
    if kind == "diffusion":
        return options
    return replace(options, sampler="one-pass", steps=1, start_timestep=None, eta=0.0, **NEUTRAL_OPTIONS)


DEFAULT_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"sampler": "ddim", "steps": 25},
    "balanced": {"sampler": "ddim", "steps": 100},
    "paper": {"sampler": "ancestral", "steps": 1000},
}


RESIZE_CHUNK = 32
"""Slices resized to and from the model's size at a time (bounds the float copies of full-resolution slices)."""

MAX_SEED = 2**32 - 1
"""Seeds are 0..2**32-1: each slice's generator is seeded with seed * 1_000_003 + slice, which must stay below
torch's 2**64 limit."""


def model_presets(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The sampler presets of a model: the defaults, with those its ``sampling_presets`` redefines or adds."""
    return {**DEFAULT_PRESETS, **config.get("sampling_presets", {})}


def preset_options(config: Mapping[str, Any], preset: str, **overrides: Any) -> SamplingOptions:
    """Checked options for a named preset of a model's ``config`` (which may redefine presets under
    ``sampling_presets``); ``overrides`` that are not None replace the preset's values (``guidance`` defaults to the
    model's ``guidance_scale``).

    Cheap (no weights needed): call it before loading the model. Every bad value is an InputError naming it.
    """
    presets = model_presets(config)
    if preset not in presets:
        raise InputError(f"unknown preset '{preset}': use one of {', '.join(presets)}")
    options = replace(SamplingOptions(**presets[preset]), **{k: v for k, v in overrides.items() if v is not None})
    if options.sampler not in SAMPLERS:
        raise InputError(f"unknown sampler '{options.sampler}': use one of {', '.join(SAMPLERS)}")
    if not 0 <= options.seed <= MAX_SEED:
        raise InputError(f"--seed {options.seed} is out of range: use 0..{MAX_SEED}")
    if options.batch_size != AUTO and (not isinstance(options.batch_size, int) or options.batch_size < 1):
        raise InputError(f"--batch-size {options.batch_size} must be at least 1 (or auto)")
    if not 0 <= options.slice_correlation <= 1:
        raise InputError(f"--slice-correlation {options.slice_correlation} is out of range: use 0..1")
    if overrides.get("guidance") is None:
        options = replace(options, guidance=float(config["model"].get("guidance_scale", 0.0)))
    if not 0 <= options.guidance < float("inf"):
        raise InputError(f"--guidance {options.guidance} is out of range: use a number >= 0 (0: no guidance)")
    if options.guidance and not config["model"].get("label_dropout"):
        raise InputError(f"--guidance {options.guidance} needs a model trained with label dropout; model "
                         f"'{config.get('name', '?')}' was not: use --guidance 0")
    if not 0 <= options.slice_agreement <= 1:
        raise InputError(f"--slice-agreement {options.slice_agreement} is out of range: use 0..1")
    if not 0 < options.slice_agreement_below <= 1:
        raise InputError(f"slice_agreement_below {options.slice_agreement_below} is out of range: use (0, 1]")
    try:
        if config.get("kind", "diffusion") == "diffusion":  # a one-pass generator ignores the sampler options
            options_sampler(options, create_diffusion(config["diffusion"]))
    except ValueError as exc:
        raise InputError(f"--steps {options.steps} (eta {options.eta}) does not fit preset '{preset}' of model "
                         f"'{config.get('name', '?')}': {exc}") from None
    return options


def options_sampler(options: SamplingOptions, diffusion: GaussianDiffusion) -> Sampler:
    """The sampler ``options`` describe, its timesteps set (ValueError for steps, start or eta out of range)."""
    return make_sampler(options.sampler, diffusion, options.steps, start_timestep=options.start_timestep,
                        **({"eta": options.eta} if options.sampler == "ddim" else {}))


@dataclass
class SynthesisResult:
    """The synthetic CT and a JSON-serialisable record of how it was made."""

    volume: Volume
    provenance: dict[str, Any]


def prepare_classes(
    segmentation: Volume,
    segment_names: Mapping[int, str] | None = None,
    labels: str = "auto",
    body_mask: Volume | None = None,
    body_margin_mm: float = BODY_MARGIN_MM,
    *,
    reference: Volume | None = None,
    classes: ClassSet = PAPER,
) -> tuple[Volume, MappingReport]:
    """Classes of ``classes`` (uint8, same grid) from a label map: structures mapped, the body class added.

    A map whose labels the convention knows but that holds none of the model's organs (a pelvis crop with only bowel
    and bones) is all body tissue (``report.organs_present`` is empty); an empty map, or one whose every label the
    convention does not know, is an InputError. The body outline comes from ``body_mask``, else from the
    ``reference`` CT (on the same grid) as training takes it (:func:`~.preprocess.body_mask_from_ct`), else from the
    labels (:func:`~.preprocess.body_mask_from_labels`); the report's ``body_source`` says which."""
    labelled = np.count_nonzero(segmentation.array)
    if not labelled:
        raise InputError("the segmentation is empty (all voxels are 0): nothing to synthesize")
    adapter = resolve_adapter(labels, segmentation.array, segment_names, classes)
    mapped, report = adapter.classes(segmentation.array)
    if sum(report.unknown.values()) == labelled:
        values = sorted(report.unknown)
        raise InputError(
            f"the '{adapter.name}' label convention knows none of the label values "
            f"({', '.join(map(str, values[:9]))}{', ...' if len(values) > 9 else ''}): no organ the model knows was "
            "found; pass --labels amos, totalseg, totalseg_v1, maisi or a JSON mapping file"
        )
    orientation = AxialOrientation.from_affine(segmentation.affine)
    for name, given in (("body mask", body_mask), ("reference CT", reference)):
        if given is not None and not given.same_grid(segmentation):
            raise InputError(f"the {name} is not on the segmentation's grid (shape, spacing, origin, direction)")
    if body_mask is not None:
        body, source = body_mask.array != 0, "body mask"
    elif reference is not None:
        body = orientation.from_stack(body_mask_from_ct(orientation.to_stack(reference.array)))
        source = f"reference CT (above {BODY_THRESHOLD_HU:g} HU, opened, largest component, holes filled)"
    elif report.has_outline:
        body = orientation.from_stack(body_mask_from_labels(orientation.to_stack(segmentation.array), has_outline=True))
        source = "body label of the segmentation"
    else:
        pixel = float(np.mean([s for axis, s in enumerate(segmentation.spacing) if axis != orientation.axes[0]]))
        body = orientation.from_stack(body_mask_from_labels(
            orientation.to_stack(segmentation.array), has_outline=False, margin_px=body_margin_mm / pixel,
            bridge_px=BODY_BRIDGE_MM / pixel))
        source = f"labelled structures (convex hull of each group + {body_margin_mm:g} mm)"
    return Volume(add_body_class(mapped, body), segmentation.affine), replace(report, body_source=source)


def synthesize(
    classes: Volume,
    model: LoadedModel,
    options: SamplingOptions = SamplingOptions(),
    *,
    device: str | torch.device = "auto",
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
    keep: Volume | None = None,
    region: Volume | None = None,
    jump_length: int | None = None,
    jump_n_sample: int | None = None,
) -> SynthesisResult:
    """Sample a synthetic CT for a model-class volume (from :func:`prepare_classes`).

    With ``keep`` (a CT on the same grid) and ``region`` (a mask): regenerate only the region. Only the slices that
    cross it are sampled, with the rest of each slice held to ``keep`` at every step (RePaint: every
    ``jump_length`` steps, default the paper's 4 % of the steps, go back that far ``jump_n_sample - 1`` times,
    default :data:`~.regenerate.DEFAULT_JUMP_N_SAMPLE`); the sample is faded into ``keep`` over a thin band inside
    the region's border, and every voxel outside the region is ``keep``'s value (as int16). See :mod:`.regenerate`.

    The same seed, options (precision included) and device give the same volume, whatever the batch size (the
    slices sampled together by the network; the whole volume walks the timesteps together) up to float rounding
    (the kernels are picked by batch size: a few voxels 1 HU apart); bit for bit for a repeated run at the same
    batch size (on CUDA with deterministic algorithms). ``cancel()`` is polled
    before every batch and raises :class:`Cancelled`. Out of memory halves the batch size and retries (the
    provenance's ``batch_size_used`` is the last one); at batch size 1 it raises :class:`CTSynthError`.
    """
    num_classes = len(model.class_set.classes)
    if classes.array.max() >= num_classes:
        raise InputError(f"class volume has values >= {num_classes}; map labels with prepare_classes first")
    if (keep is None) != (region is None):
        raise InputError("regenerating a region needs both the kept CT and the region")
    edit = None if keep is None or region is None else RegionEdit.checked(classes, keep, region)
    if edit is not None and model.kind != "diffusion":
        raise InputError(f"model '{model.name}' is a one-pass generator: it cannot regenerate a region (it has no "
                         "steps to hold the kept CT in); use a diffusion model")
    device = select_device(device) if isinstance(device, str) else device
    options = replace(options, precision=select_precision(options.precision, device))
    model.model.to(device)
    orientation = AxialOrientation.from_affine(classes.affine)
    stack = orientation.to_stack(classes.array)
    resize = PlaneResize(stack.shape[1], stack.shape[2], model.image_size)
    active = np.flatnonzero(stack.any(axis=(1, 2)))
    sampler = options_sampler(options, model.diffusion) if model.kind == "diffusion" else None
    prior = _model_prior(model) if options.start_timestep is not None and sampler is not None else None
    if edit is not None:
        active = np.intersect1d(active, np.flatnonzero(orientation.to_stack(edit.region).any(axis=(1, 2))))
    if not len(active):
        where = "the class volume" if edit is None else "the region"
        raise InputError(f"{where} has no body or organ voxel: nothing to synthesize")
    small = torch.cat([resize.to_model(torch.from_numpy(stack[part].astype(np.int64)), labels=True).to(torch.uint8)
                       for part in _parts(active)])

    used: list[int] = []  # the batch sizes the denoiser took

    def on_step(fraction: float) -> None:
        if progress is not None:
            progress(fraction * len(active), len(active))

    try:
        network = torch.compile(model.model) if options.compile else model.model
        if sampler is None:
            inpaint = None
            sample = generate_slices(network, small, active, seed=options.seed, device=device,
                                     batch_size=options.batch_size, precision=options.precision, cancel=cancel,
                                     on_step=on_step, on_batch_size=used.append)
        else:
            inpaint = None if edit is None else _inpainting(
                edit, orientation, resize, active, _jumps(sampler.num_steps, jump_length, jump_n_sample), model.intensity)
            sample = sample_slices(network, model.conditioning, sampler, small, active, seed=options.seed,
                                   device=device, batch_size=options.batch_size, prior=prior,
                                   precision=options.precision, cancel=cancel, on_step=on_step,
                                   slice_correlation=options.slice_correlation, inpaint=inpaint, guidance=options.guidance,
                                   slice_agreement=(options.slice_agreement, options.slice_agreement_below),
                                   on_batch_size=used.append)
    except torch.OutOfMemoryError:
        raise CTSynthError(f"out of memory on {device} even with batch size 1 (one slice at a time): use --device cpu "
                           "or a smaller model") from None
    restore = _boundary_restorer(stack, active, sample, resize, model) if options.boundary_correction else None
    hu = np.full(classes.array.shape, AIR_HU, dtype=np.int16)  # the output, filled through its stack view part
    hu_stack, first = orientation.to_stack(hu), 0                 # by part: no full-volume float temporaries
    for part in _parts(active):
        low = sample[first : first + len(part)]
        full = restore(stack[part], first) if restore is not None else hu_from_model(
            resize, torch.from_numpy(model.intensity.to_hu(low.numpy())), model.intensity.hu_range).numpy()
        hu_stack[part] = np.where(stack[part] == BACKGROUND, AIR_HU, np.rint(full))
        first += len(part)
    volume = Volume(hu, classes.affine)
    record = provenance_record(model.name, model.sha256, model.conditioning,
                               sampler.config if sampler is not None else {"sampler": "one-pass"},
                               asdict(used_options(options, model.kind)), str(device), len(active))
    record.update(classes=list(model.class_set.classes), class_set=model.class_set.name,
                  intensity=model.intensity.config())
    record.update(precision=options.precision, device_capability=device_capability(device), kind=model.kind,
                  batch_size_used=used[-1])
    if edit is not None and inpaint is not None:
        volume = Volume(edit.blend(volume.array), classes.affine)
        record["region"] = edit.record(asdict(inpaint.jumps))
    return SynthesisResult(volume, record)


def _boundary_restorer(stack: np.ndarray, active: np.ndarray, sample: torch.Tensor, resize: PlaneResize,
                       model: LoadedModel) -> Callable[[np.ndarray, int], np.ndarray]:
    """(a part's classes, its first row in ``sample``) -> HU, boundaries restored (:mod:`.partial_volume`)."""
    mapping = model.intensity
    sample_hu = torch.from_numpy(mapping.to_hu(sample.numpy()))  # model-size slices: small
    estimate, first = ClassValues(len(model.class_set.classes), resize), 0
    for part in _parts(active):
        estimate.add(stack[part], sample_hu[first : first + len(part)])
        first += len(part)
    values = estimate.solve(mapping.hu_range)
    return lambda classes, start: restore_boundaries(classes, sample_hu[start : start + len(classes)], resize, values,
                                                     mapping.hu_range)


def _jumps(num_steps: int, length: int | None, n_sample: int | None) -> Jumps:
    """RePaint's jumps: ``length`` (default :meth:`Jumps.scaled` to ``num_steps``) and ``n_sample`` (default
    :data:`~.regenerate.DEFAULT_JUMP_N_SAMPLE`)."""
    scaled = Jumps.scaled(num_steps, DEFAULT_JUMP_N_SAMPLE if n_sample is None else n_sample)
    return scaled if length is None else replace(scaled, length=length)


def _inpainting(edit: RegionEdit, orientation: AxialOrientation, resize: PlaneResize, active: np.ndarray,
                jumps: Jumps, intensity: IntensityMapping = PAPER_WINDOW) -> Inpainting:
    """The kept CT (resized in HU, mapped by the model's ``intensity``, in [-1, 1]) and the region (1 where any of it
    falls in a pixel) of the ``active`` slices on the model's grid."""
    keep, region = orientation.to_stack(edit.keep), orientation.to_stack(edit.region)
    known = torch.cat([torch.from_numpy(intensity.to_unit(hu_to_model(
        resize, torch.from_numpy(keep[part].astype(np.float32)), intensity.hu_range).numpy())) for part in _parts(active)])
    unknown = torch.cat([resize.to_model(torch.from_numpy(region[part].astype(np.float32)), labels=False) > 0
                         for part in _parts(active)])
    return Inpainting(known[:, None] * 2 - 1, unknown[:, None].float(), jumps)


def _parts(active: np.ndarray) -> list[np.ndarray]:
    """``active`` in runs of :data:`RESIZE_CHUNK` slices."""
    return [active[first : first + RESIZE_CHUNK] for first in range(0, len(active), RESIZE_CHUNK)]


def class_prior(class_means: Sequence[float]) -> torch.Tensor:
    """Per-class mean intensities in [0, 1] -> the prior's values in the diffusion's [-1, 1] space."""
    return torch.tensor(list(class_means), dtype=torch.float32) * 2 - 1


def _model_prior(model: LoadedModel) -> torch.Tensor:
    means = model.config.get("class_means")
    if means is None or len(means) != len(model.class_set.classes):
        raise InputError(
            f"model '{model.name}' has no per-class mean intensities (class_means), so it cannot start from a prior: "
            "drop the start timestep or use another preset"
        )
    return class_prior(means)


def sample_slices(
    network: torch.nn.Module,
    conditioning: str,
    sampler: Any,
    classes: torch.Tensor,
    slice_index: Sequence[int],
    *,
    seed: int,
    device: torch.device,
    batch_size: int | str | None = None,
    prior: torch.Tensor | None = None,
    precision: str = "fp32",
    cancel: Callable[[], bool] | None = None,
    on_step: Callable[[float], None] | None = None,
    slice_correlation: float = 0.0,
    inpaint: Inpainting | None = None,
    guidance: float = 0.0,
    slice_agreement: tuple[float, float] = (0.0, 1.0),
    on_batch_size: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Sample the (N, S, S) class slices of one volume together; returns (N, S, S) intensities in [0, 1] on the CPU.

    A 2.5D network (``context_slices`` k) also sees the neighbours' classes, taken from ``classes`` by slice number
    (:func:`~.slice_context.with_neighbours`), unless ``classes`` is (N, 1 + 2k, S, S) with them already.

    Every slice walks the same timesteps at the same time (the sampler sees the whole (N, 1, S, S) state); the
    network runs ``batch_size`` slices at a time (default: all; "auto": measured, halved on out-of-memory, each
    batch size taken goes to ``on_batch_size``), see :class:`~.denoiser.VolumeDenoiser`.
    ``slice_index`` seeds one generator per slice, which draws that slice's starting noise and then the noise of
    every stochastic step, so a slice's sample does not depend on the batch size; ``slice_correlation`` mixes
    in noise shared with the neighbouring slices (:class:`~.diffusion.slice_noise.SliceNoise`); ``slice_agreement``
    (strength, below) blends every step's x0 with the neighbours' (:class:`~.diffusion.slice_agreement.SliceAgreement`).
    ``prior`` (per-class values in [-1, 1], see :func:`class_prior`) is noised to the sampler's first timestep as the
    start (SDEdit). ``guidance`` s != 0 is classifier-free guidance. ``inpaint`` holds a known area to every step
    (RePaint, :func:`~.diffusion.samplers.repaint.repaint_loop`). ``precision`` 'bf16'/'fp16' runs the network under
    autocast (with channels_last inputs on the CPU: :data:`~.denoiser.CHANNELS_LAST_DEVICES`). ``on_step(fraction)``
    follows every chunk. Nothing in the loop waits for the device or copies from the host: the class slices go to
    the device once and the finiteness check is read once, at the end.
    """
    conditions = with_neighbours(classes, slice_index, network_context(network))
    classes = conditions[:, 0] if conditions.ndim == 4 else conditions
    size = classes.shape[-1]
    total = len(slice_index) * (sampler.num_steps if inpaint is None else inpaint.jumps.evaluations(sampler.num_steps))

    def on_evaluated(evaluated: int) -> None:
        if on_step is not None:
            on_step(min(1.0, evaluated / total))

    noise_source = SliceNoise(seed, slice_index, slice_correlation, device=device)
    denoiser = VolumeDenoiser(network, conditioning, conditions, batch_size=batch_size, device=device,
                              precision=precision, guidance=guidance, cancel=cancel, progress=on_evaluated,
                              on_batch_size=on_batch_size)
    model_fn = SliceAgreement(denoiser, sampler.diffusion, classes, slice_index, slice_agreement[0],
                              below=slice_agreement[1], clip_denoised=sampler.clip_denoised, device=device)
    with torch.inference_mode():
        noise = noise_source.draw((len(slice_index), 1, size, size))
        x = noise if prior is None else sampler.add_noise(prior.to(device)[classes.to(device).long()][:, None], 0,
                                                          noise)
        loop = (sample_loop(model_fn, sampler, x, {}, noise_source) if inpaint is None else
                repaint_loop(model_fn, sampler, x, inpaint.to(device), noise_source))
        for _, _, x, _ in loop:
            pass
        if not bool(denoiser.finite):
            raise CTSynthError("the model's output became NaN or infinite while sampling; nothing was written: the "
                               "model may be broken, or try --device cpu or --precision fp32")
        return ((x[:, 0].float().clamp(-1, 1) + 1) / 2).cpu()


def generate_slices(
    generator: torch.nn.Module,
    classes: torch.Tensor,
    slice_index: Sequence[int],
    *,
    seed: int,
    device: torch.device,
    batch_size: int | str | None = None,
    precision: str = "fp32",
    cancel: Callable[[], bool] | None = None,
    on_step: Callable[[float], None] | None = None,
    on_batch_size: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """One forward pass of a one-pass generator (:mod:`.models.generators`) for (N, S, S) class slices, ``batch_size``
    at a time (default: all; "auto": :data:`~.denoiser.FIXED_AUTO_BATCH`); returns (N, S, S) intensities in [0, 1] on the CPU. A generator that takes noise
    (OASIS) draws it from each slice's own generator (seeded as in :func:`sample_slices`), so a slice's image does not
    depend on its batch. ``cancel()`` is polled before every batch, ``on_step(fraction)`` follows every batch."""
    batch = len(classes) if batch_size is None else FIXED_AUTO_BATCH if batch_size == AUTO else max(1, int(batch_size))
    if on_batch_size is not None:
        on_batch_size(batch)
    noise = None
    if generator.noise_channels:
        noise = SliceNoise(seed, slice_index, device=device).draw((len(slice_index), generator.noise_channels))
    outputs, classes = [], classes.to(device)  # uint8, copied once; each batch's one-hot is built on the device
    with torch.inference_mode(), precision_autocast(device, precision):
        for first in range(0, len(classes), batch):
            if cancel is not None and cancel():
                raise Cancelled("cancelled by the user; nothing was written")
            mask = to_memory_format(one_hot(classes[first : first + batch].long(), network_classes(generator)),
                                    precision)
            outputs.append(generator(mask, None if noise is None else noise[first : first + batch]).float())
            if on_step is not None:
                on_step(min(1.0, (first + batch) / len(classes)))
    out = torch.cat(outputs)
    if not bool(torch.isfinite(out).all()):
        raise CTSynthError("the generator's output is NaN or infinite; nothing was written: the model may be broken, "
                           "or try --precision fp32")
    return ((out[:, 0].clamp(-1, 1) + 1) / 2).cpu()


def evaluation_flops(model: LoadedModel) -> int:
    """Floating-point operations of one network evaluation for one slice (a multiply-add counts 2), counted by
    torch's FlopCounterMode on a blank slice: the per-step cost, excluding the once-per-batch condition encoder."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.image_size
    classes = with_neighbours(torch.zeros((1, size, size), dtype=torch.long), [0], network_context(model.model))
    device = next(model.model.parameters()).device
    kwargs: dict[str, Any] = {k: v.to(device) for k, v in condition_inputs(classes, model.conditioning,
                                                                                     network_classes(model.model)).items()}
    with torch.inference_mode():
        features = model.model.encode_condition(**kwargs)
        if features is not None:
            kwargs["cond_features"] = features
        x = torch.zeros((1, 1, size, size), device=device)
        with FlopCounterMode(display=False) as counter:
            model.model(x, torch.zeros((1,), dtype=torch.long, device=device), **kwargs)
    return int(counter.get_total_flops())
