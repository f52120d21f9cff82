#!/usr/bin/env bash
# A tool that must not share distinfer's environment (vLLM pins another transformers; AIPerf and guidellm are
# clients measured beside distinfer's) in an environment of its own, one per user and set of pins (as pre-commit
# keeps its tools' environments): built once under a lock, then linked into each clone that asks for it.
#   scripts/tool-env.sh ENV_DIR LINK PIN...
# ENV_DIR is named by the pins (the Makefile computes it), so a change of them builds a new environment.
# $AFTER_INSTALL, where set, is a shell command run once the pins are installed, with the environment's bin folder
# first on PATH.
set -euo pipefail
env_dir=$1 link=$2
shift 2
python=${PYTHON:-python3}
mkdir -p "$(dirname "$env_dir")"
exec 9>"$env_dir.lock"
flock 9
if [ ! -f "$env_dir/.installed" ]; then
  echo "building $(basename "$env_dir") in $env_dir (once; $*)"
  rm -rf "$env_dir"
  "$python" -m venv "$env_dir"
  "$env_dir/bin/pip" install -q --upgrade pip
  "$env_dir/bin/pip" install -q "$@"
  if [ -n "${AFTER_INSTALL:-}" ]; then
    PATH="$env_dir/bin:$PATH" bash -c "$AFTER_INSTALL"
  fi
  touch "$env_dir/.installed"
fi
if [ -d "$link" ] && [ ! -L "$link" ]; then
  echo "$link is a folder of its own (made before environments were shared): kept; remove it to use $env_dir"
else
  ln -sfn "$env_dir" "$link"
fi
