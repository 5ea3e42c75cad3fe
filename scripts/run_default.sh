#!/usr/bin/env bash
# Main job on the built-in default: set up, quantize SmolLM2-135M-Instruct,
# evaluate it against the original and print a short table.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/lowbit" demo "$@"
