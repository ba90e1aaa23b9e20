#!/usr/bin/env bash
# make test-vllm: vLLM's CPU build in its own venv (build/vllm), then tests/test_vllm.py with the
# project's venv and the workspace: vLLM serving the toy checkpoint, asked by the remote answerer
# and by the node. Skips, saying why, where the environment cannot be built.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=build/vllm
stamp=$(cat requirements/vllm.txt scripts/vllm_torchvision_ops.py | sha256sum | cut -c1-16)
if [ ! -f "$VENV/ready.$stamp" ]; then
  rm -rf "$VENV"
  mkdir -p build
  echo "make test-vllm: installing requirements/vllm.txt into $VENV (3.5 GB, a few minutes, once)"
  started=$SECONDS
  { "$PYTHON" -m venv "$VENV" && "$VENV/bin/pip" install -q -r requirements/vllm.txt; } > build/vllm.log 2>&1 \
    || { echo "make test-vllm: SKIPPED: could not install vLLM (see build/vllm.log)"; exit 0; }
  # PyPI's torchaudio and torchcodec for this torch are CUDA builds that fail to import; vLLM's
  # text and image path does not need them. torchvision stays, see the ops file.
  "$VENV/bin/pip" uninstall -q -y torchaudio torchcodec >> build/vllm.log 2>&1
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp scripts/vllm_torchvision_ops.py "$site/_internvl_torchvision_ops.py"
  echo "import _internvl_torchvision_ops" > "$site/_internvl_torchvision_ops.pth"
  "$VENV/bin/python" -c "import vllm, torchvision" >> build/vllm.log 2>&1 \
    || { echo "make test-vllm: SKIPPED: vLLM does not import here (see build/vllm.log)"; exit 0; }
  echo "make test-vllm: vLLM installed in $((SECONDS - started)) s"
  touch "$VENV/ready.$stamp"
fi
INTERNVL_VLLM_PYTHON="$(pwd)/$VENV/bin/python" "$@" tests/test_vllm.py
