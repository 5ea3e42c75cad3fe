#!/usr/bin/env bash
# Make the venv that benchmarks/reference_gptq.py runs in: llm-compressor 0.14.0.1 on CPU torch 2.13.0.
# It is separate from lowbit's venv because llm-compressor needs transformers 5.x.
#   bash benchmarks/setup_reference_venv.sh [VENV_DIR]      (default /tmp/refvenv; about 1 minute)
set -euo pipefail
VENV="${1:-/tmp/refvenv}"
PY="${PYTHON:-python3}"

"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip

# torch first and pinned: an unpinned torch would pull the CUDA build (GBs) instead of the CPU wheel
"$VENV/bin/pip" install -q "torch==2.13.0"

# the exact set that installed and ran on 2026-11-25 (pip freeze); torch is held at 2.13.0+cpu
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat > "$CONSTRAINTS" <<'EOF'
torch==2.13.0+cpu
llmcompressor==0.14.0.1
compressed-tensors==0.19.0
transformers==5.17.0
tokenizers==0.23.3
safetensors==0.8.0
accelerate==1.15.0
auto-round==0.15.1
datasets==5.2.0
huggingface_hub==1.33.0
numpy==2.4.6
pandas==3.1.1
pyarrow==26.0.1
pydantic==2.14.4
pydantic_core==2.50.5
loguru==0.7.3
psutil==7.2.2
regex==2026.11.19
tqdm==4.70.1
PyYAML==6.0.4
EOF
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" "llmcompressor==0.14.0.1"

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.__version__ == "2.13.0+cpu", f"torch was replaced: {torch.__version__}"
for p in ("llmcompressor", "compressed-tensors", "transformers", "tokenizers", "torch"):
    print(f"{p}=={md.version(p)}")
EOF
