#!/usr/bin/env bash
# The Python packages the offline GPU node lacks, fetched here for benchmarks/gpu_check.sh.
#
#     bash benchmarks/gpu_wheels.sh    # -> .whl/site.tar.xz (git-ignored), .whl/MANIFEST
#
# The node: Python 3.12, torch 2.11 (CUDA 13), numpy, scipy, safetensors, pyyaml, tqdm, scikit-image, pillow; no
# nibabel, no SimpleITK, no network. Their manylinux cp312 wheels are downloaded (the versions the tests run with),
# unpacked and repacked as one xz archive: SimpleITK's 53 MB wheel would put the checkout plus wheels at ~64 MiB,
# the most that travels to the device machine; as xz they take about half. Never torch. Carry `.whl` with the
# checkout; gpu_check.sh unpacks it into a temporary folder.
# Environment: PYTHON (a Python with pip; default .venv/bin/python, else python3).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
PACKAGES=(nibabel==5.4.2 simpleitk==2.5.7)
LIMIT_MIB=64
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$TMP/wheels" "${PACKAGES[@]}"
mkdir -p "$TMP/site" .whl
for wheel in "$TMP"/wheels/*.whl; do
  case "$(basename "$wheel")" in torch-*|nvidia_*) echo "gpu_wheels: refusing $(basename "$wheel")" >&2; exit 1 ;; esac
  "$PY" -m zipfile -e "$wheel" "$TMP/site"
done
tar -C "$TMP/site" -cf - . | xz -T0 -6 > .whl/site.tar.xz.part
mv .whl/site.tar.xz.part .whl/site.tar.xz
(cd "$TMP/wheels" && sha256sum ./*.whl) > .whl/MANIFEST

tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carried=$(du -cb .whl | tail -1 | cut -f1)
total=$(( tracked + carried ))
echo "gpu_wheels: .whl/site.tar.xz $(( carried / 1024 / 1024 )) MiB ($(ls "$TMP"/wheels | tr '\n' ' ')); checkout $(( tracked / 1024 / 1024 )) MiB; together $(( total / 1024 / 1024 )) MiB of $LIMIT_MIB"
if (( total >= LIMIT_MIB * 1024 * 1024 )); then
  echo "gpu_wheels: the checkout plus .whl is over $LIMIT_MIB MiB" >&2
  exit 1
fi
