#!/usr/bin/env bash
# Create .venv in the repository root and install edgehmoe with all extras.
# torch/torchvision are pinned to versions that exist as CPU-capable wheels for the
# machine: on x86_64 the 2.14.1/0.29.1 pair, on aarch64 (Raspberry Pi 4/5) PyPI's CPU wheels.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$here/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
case "$(uname -m)" in
  x86_64)  torch_pins=(torch==2.14.1 torchvision==0.29.1) ;;
  aarch64) torch_pins=(torch==2.9.1 torchvision==0.24.1) ;;
  *)       torch_pins=(torch torchvision) ;;
esac
if ! "$venv/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "setup_env: installing ${torch_pins[*]} (large download on a new machine)"
  "${pip[@]}" install -q "${torch_pins[@]}"
fi
"${pip[@]}" install -q -e "$here[all]"
"$venv/bin/python" -c "import edgehmoe, torch, onnxruntime, paho.mqtt, psutil, nltk; print('setup_env: ok, torch', torch.__version__)"
