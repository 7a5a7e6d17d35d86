#!/usr/bin/env bash
# The trainer's and sampler's GPU paths on a lent GPU, in under 8 minutes; paste the output into
# docs/benchmarks.md.
#
#     bash benchmarks/gpu_check.sh            # on a CUDA machine (writes into a temporary folder)
#     bash benchmarks/gpu_check.sh --dry-run  # every stage, tiny, on the CPU (checks the script itself)
#
# Stages: environment (GPU, torch, native bf16); the bundled sample prepared at 256 px; the paper-size model
# trained 60 iterations in bf16 and resumed to 80, against an uninterrupted 80 (finite loss, continuation);
# it/s, achieved TFLOP/s against the chip's bf16 peak, time waiting for data and host-device copies per step
# (torch.profiler); peak memory at batch 16/32/64 with and without activation checkpointing, channels_last and
# torch.compile; bf16 vs fp32 loss at t in {0, 1, 10, 999}; the attention kernel; sampling a 300-slice volume
# twice with one seed (identical? batch size auto), an out-of-memory during sampling (halved and retried, volume
# written?), and the volume per preset and precision (TFLOP/s, peak memory).
# Environment: PYTHON (default .venv/bin/python, else python3), WORK (default a new temporary folder).
set -uo pipefail

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
WORK="${WORK:-$(mktemp -d)}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 WORK DRY
START=$SECONDS

if (( DRY )); then
  DEVICE=cpu SIZE=32 BATCHES="2" ITERS=6 HALF=4 PRECISION=fp32 SLICES=12  # CPU bf16 can be emulated (slow)
  NET=(--model-channels 8 --channel-mult 1,2 --num-res-blocks 1 --attention-resolutions 2 --num-heads 1)
  ARCH=(--arch demo --image-size 32 --threads 1 --iterations 2 --warmup 1)
  SYNTH=(--steps 2 --threads 1) SAMPLING=("fast fp32")
else
  DEVICE=cuda SIZE=256 BATCHES="16 32 64" ITERS=80 HALF=60 PRECISION=bf16 SLICES=300
  NET=()  # the paper's network (train_defaults)
  ARCH=(--arch paper --image-size 256 --iterations 5 --warmup 2)
  SYNTH=() SAMPLING=("fast bf16" "fast fp32" "balanced bf16")
fi
export DEVICE SIZE PRECISION SLICES

stage() { echo; echo "== $1 ($((SECONDS - START)) s)"; }
run() { echo "\$ $*"; "$@"; }

stage "environment"
echo "work folder: $WORK; git $(git rev-parse --short HEAD 2>/dev/null)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"native bf16 {torch.cuda.is_bf16_supported(including_emulation=False)}")
else:
    print("no CUDA GPU (dry run on the CPU)")
EOF

stage "prepare the bundled sample at $SIZE px"
mkdir -p "$WORK/src/images" "$WORK/src/labels"
ln -sf "$REPO/Resources/sample/ct.nii.gz" "$WORK/src/images/sample.nii.gz"
ln -sf "$REPO/Resources/sample/seg_total.nii.gz" "$WORK/src/labels/sample.nii.gz"
run timeout 300 "$PY" -m training.prepare --images "$WORK/src/images" --labels "$WORK/src/labels" \
  --convention totalseg --holdout-every 8 --size "$SIZE" --workers 4 --out "$WORK/cache"

stage "train $HALF iterations in $PRECISION, resume to $ITERS, against an uninterrupted $ITERS"
TRAIN=(-m training.train --data "$WORK/cache" "${NET[@]}" --batch-size 16 --precision "$PRECISION" --device "$DEVICE"
       --log-every 10 --checkpoint-every 20 --sample-every 0 --dropout 0.1)
(( DRY )) && TRAIN+=(--batch-size 4 --log-every 1 --checkpoint-every 2 --threads 1)
run timeout 300 "$PY" "${TRAIN[@]}" --out "$WORK/whole" --iterations "$ITERS"
run timeout 300 "$PY" "${TRAIN[@]}" --out "$WORK/parts" --iterations "$HALF"
run timeout 300 "$PY" "${TRAIN[@]}" --out "$WORK/parts" --iterations "$ITERS" --resume
"$PY" - <<'EOF'
import csv, math, os, torch
work = os.environ["WORK"]
rows = {name: list(csv.DictReader(open(f"{work}/{name}/log.csv"))) for name in ("whole", "parts")}
for row_a, row_b in zip(rows["whole"], rows["parts"]):
    print(f"step {row_a['step']:>4}: loss {row_a['loss']} (whole) {row_b['loss']} (resumed)  it/s {row_a['it_per_s']}")
finite = all(math.isfinite(float(r["loss"])) for rs in rows.values() for r in rs)
a, b = (torch.load(f"{work}/{n}/checkpoint.pt", map_location="cpu", weights_only=True) for n in ("whole", "parts"))
diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
scale = max(a["model"][k].float().abs().max().item() for k in a["model"])
print(f"finite losses: {finite}; max |weight difference| whole vs resumed after {a['step']} steps: {diff:.3g} "
      f"(largest weight {scale:.3g}; 0 = bitwise identical, cuDNN autotuning may pick other kernels)")
EOF

stage "step profile: it/s, TFLOP/s, data wait, host-device copies"
"$PY" - <<'EOF'
import os, time, torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from training import train

work, device = os.environ["WORK"], os.environ["DEVICE"]
config, _ = train.parse_config(["--config", os.devnull, "--data", f"{work}/cache", "--out", f"{work}/whole",
                                "--device", device, "--precision", os.environ["PRECISION"], "--batch-size",
                                "4" if os.environ["DRY"] == "1" else "16"]
                               + (["--model-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1",
                                   "--attention-resolutions", "2", "--num-heads", "1", "--threads", "1"]
                                  if os.environ["DRY"] == "1" else []))
trainer = train.Trainer(config, resume=True)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
waits = []
slices = trainer._slices
def timed_slices():
    tic = time.perf_counter()
    out = slices()
    waits.append(time.perf_counter() - tic)
    return out
trainer._slices = timed_slices
for _ in range(5):
    trainer.train_step()
sync()
with FlopCounterMode(display=False) as flops:
    trainer.train_step()
steps, waits[:] = 20, []
sync(); tic = time.perf_counter()
for _ in range(steps):
    trainer.train_step()
sync(); seconds = (time.perf_counter() - tic) / steps
tflops = flops.get_total_flops() / seconds / 1e12
peaks = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "RTX 4090": 165, "A6000": 155}
name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
peak = next((v for k, v in peaks.items() if k in name), None)
print(f"{1 / seconds:.2f} it/s at batch {config['batch_size']} ({seconds * 1e3:.0f} ms/step); "
      f"{flops.get_total_flops() / 1e12:.2f} TFLOP per step -> {tflops:.1f} TFLOP/s"
      + (f" = {100 * tflops / peak:.0f} % of the {name} dense bf16 peak ({peak} TFLOP/s)" if peak else ""))
print(f"host time in the data path per step: {1e3 * sum(waits) / len(waits):.2f} ms (mean), {1e3 * max(waits):.2f} ms (max)")
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
with profile(activities=acts) as prof:
    for _ in range(5):
        trainer.train_step()
    sync()
names = [e.name for e in prof.events()]
for kind in ("HtoD", "DtoH", "DtoD"):
    print(f"Memcpy {kind} per step: {sum(kind in n and 'Memcpy' in n for n in names) / 5:.1f}")
print(f"aten::_local_scalar_dense (.item(); a GPU sync on CUDA tensors, not on CPU ones like AdamW's step) per step: {sum(n == 'aten::_local_scalar_dense' for n in names) / 5:.1f}")
attention = sorted({n for n in names if any(s in n.lower() for s in ("flash", "fmha", "efficient_attention", "cudnn_attention", "scaled_dot"))})
print("attention kernels: " + (", ".join(attention[:6]) or "none found"))
EOF

stage "peak memory at batch ${BATCHES// //}, with and without activation checkpointing"
for batch in $BATCHES; do
  for ckpt in "" --use-checkpoint; do
    echo "-- batch $batch ${ckpt:-(no checkpointing)}"
    timeout 180 "$PY" benchmarks/train_step.py "${ARCH[@]}" --device "$DEVICE" --precision "$PRECISION" --no-peer \
      --batch-size "$batch" $ckpt 2>&1 | grep -E "^\| CTSemantic|Error|error" | tail -2
  done
done
for extra in --channels-last --compile; do
  echo "-- batch ${BATCHES%% *} $extra"
  timeout 240 "$PY" benchmarks/train_step.py "${ARCH[@]}" --device "$DEVICE" --precision "$PRECISION" --no-peer \
    --batch-size "${BATCHES%% *}" $extra 2>&1 | grep -E "^\| CTSemantic|Error|error" | tail -2
done

stage "bf16 vs fp32 training loss at t in {0, 1, 10, 999} (trained weights, fixed batch and noise)"
"$PY" - <<'EOF'
import contextlib, os, torch
from CTSemanticSynthLib.preprocess import condition_inputs
from training import train
from training.dataset import SliceCache
from training.train import model_batch

work, device = os.environ["WORK"], torch.device(os.environ["DEVICE"])
state = torch.load(f"{work}/whole/checkpoint.pt", map_location="cpu", weights_only=True)
import json
config = json.loads(state["config"])
data = SliceCache(f"{work}/cache", "train")
model = train.create_model(train.model_config(config, data.image_size)).to(device)
model.load_state_dict(state["model"])
diffusion = train.create_diffusion(train.diffusion_config(config))
images, classes = model_batch(*(a.to(device) for a in data.load(range(min(8, len(data))))))
inputs = condition_inputs(classes, config["conditioning"])
noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).to(device)
for t in (0, 1, 10, min(999, diffusion.num_timesteps - 1)):
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            out = diffusion.training_losses(model, images, torch.full((len(images),), t, device=device), inputs, noise)
        losses[precision] = {k: out[k].float().mean().item() for k in ("loss", "mse", "vb")}
    print(f"t={t:>3}: " + "  ".join(f"{k} fp32 {losses['fp32'][k]:.5g} bf16 {losses['bf16'][k]:.5g}" for k in ("loss", "mse", "vb")))
EOF

stage "sampling a $SLICES-slice volume twice with one seed, and out of memory"
"$PY" - <<'EOF'
import os, nibabel as nib, numpy as np
work, slices = os.environ["WORK"], int(os.environ.get("SLICES", "300"))
img = nib.load("Resources/sample/seg_total.nii.gz")
data = np.asarray(img.dataobj)
reps = -(-slices // data.shape[2])
nib.save(nib.Nifti1Image(np.concatenate([data] * reps, axis=2)[:, :, :slices].astype(np.uint8), img.affine),
         f"{work}/long_seg.nii.gz")
EOF
SYN=(-m CTSemanticSynthLib.cli synth --seg "$WORK/long_seg.nii.gz" --model "$WORK/whole/model" --labels totalseg
     --device "$DEVICE" --preset fast --seed 7 --overwrite)
(( DRY )) && SYN+=(--steps 2)
for i in 1 2; do
  tic=$SECONDS
  timeout 240 "$PY" "${SYN[@]}" --out "$WORK/syn$i.nii.gz" 2>&1 | tail -3
  echo "synth run $i: $((SECONDS - tic)) s wall (model load included)"
done
"$PY" -c "
import json, nibabel as nib, numpy as np, os
a, b = (np.asarray(nib.load(os.environ['WORK'] + f'/syn{i}.nii.gz').dataobj) for i in (1, 2))
print(f'same seed twice: identical {np.array_equal(a, b)}, max |difference| {np.abs(a.astype(int) - b).max()} HU, shape {a.shape}')
print('batch size auto used', json.load(open(os.environ['WORK'] + '/syn1.json'))['batch_size_used'])"
echo "-- out of memory: all $SLICES slices at once (--batch-size 100000) with the GPU capped at 5 % of its memory"
timeout 240 "$PY" - -v "${SYN[@]:2}" --out "$WORK/oom.nii.gz" --batch-size 100000 <<'EOF' 2>&1 | grep -E "out of memory|error|status" | tail -8
import json, os, sys, torch
from CTSemanticSynthLib.cli import main
if torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(0.05)
code = main(sys.argv[1:])
out = os.environ["WORK"] + "/oom.json"
print(f"exit status {code}; volume written: {os.path.exists(out)}"
      + (f", batch size used {json.load(open(out))['batch_size_used']}" if os.path.exists(out) else ""))
EOF
for run in "${SAMPLING[@]}"; do
  read -r preset precision <<< "$run"
  echo "-- benchmarks/synthesis.py: $SLICES slices, preset $preset, $precision, batch size auto"
  timeout 240 "$PY" benchmarks/synthesis.py --device "$DEVICE" --seg "$WORK/long_seg.nii.gz" --model "$WORK/whole/model" \
    --preset "$preset" --precision "$precision" --batch-size auto --repeats 1 "${SYNTH[@]}" 2>&1 | tail -4
done

stage "done"
echo "total $((SECONDS - START)) s; work folder $WORK"
