#!/usr/bin/env bash
# llama.cpp for the GGUF interop checks (tests/test_gguf_llamacpp.py,
# benchmarks/interop_gguf.py); scripts/test.sh runs it, so CI checks every GGUF
# type with llama.cpp itself. llama-cpp-python builds llama.cpp from source; only
# the libraries it loads are built (no tools, server, tests, examples or the
# multimodal library): 4 minutes on the idle 2-core development machine (13 with
# the defaults). pip caches the built wheel, so a later install of the same
# version takes seconds. Run after scripts/setup.sh. Never touches torch (the two
# dependencies it needs are installed explicitly, then the package with --no-deps).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LOWBIT_VENV:-$root/.venv}"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install "diskcache>=5.6.1" "jinja2>=2.11.3"
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF}" \
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "${pip[@]}" install --no-deps "llama-cpp-python==0.3.36"
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
