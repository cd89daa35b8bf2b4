#!/usr/bin/env bash
# Wheels that tools/gpu_check.sh installs on the GPU machine (it has torch, numpy, scipy,
# safetensors, imageio, numba, rich, tqdm and pytest, but no package index): into .whl/,
# which .git/info/exclude should list (echo /.whl/ >> .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
  "${plat[@]}" -d .whl gsplat OpenEXR dearpygui
ls -la .whl
