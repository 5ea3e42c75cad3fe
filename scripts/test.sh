#!/usr/bin/env bash
# Whole test suite, set-up included. `.ci/run` calls exactly this.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
bash "$root/scripts/setup_interop.sh"  # llama.cpp, for tests/test_gguf_llamacpp.py
cd "$root"
# the llama.cpp checks must run here, not skip
LOWBIT_REQUIRE_LLAMACPP=1 exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
