#!/usr/bin/env bash
# llama.cpp for the GGUF interop checks (tests/test_gguf_llamacpp.py,
# benchmarks/interop_gguf.py); scripts/test.sh runs it, so CI checks every GGUF
# type with llama.cpp itself. llama-cpp-python builds llama.cpp from source; only
# the libraries it loads are built (no tools, server, tests, examples or the
# multimodal library): about 4 minutes on 2 idle cores. Run after scripts/setup.sh.
# Never touches torch (the two dependencies it needs are installed explicitly,
# then the package with --no-deps).
#
# Portable build: never -march=native (GGML_NATIVE=OFF) and never AMX. The
# instruction sets are named explicitly, from a fixed list of levels:
#   avx512  AVX2/FMA/F16C/BMI2 + AVX-512 F/CD/VL/DQ/BW + VBMI + VNNI + BF16
#           (every CI host here: AMD Zen 5 and Intel Xeon, with or without AMX)
#   avx2    AVX2/FMA/F16C/BMI2 (any x86-64 from the last ten years)
# The level is the highest one this CPU supports, or LOWBIT_LLAMACPP_ISA=avx2|avx512.
# (ggml's -march=native build crashed CI with SIGILL on Xeon hosts that advertise
# AMX: its AMX path ran tileloadd without a usable tile configuration.)
# The level and its CPU flags are recorded in $venv/llama_cpp_build.json; the
# tests check the running CPU against it and run llama.cpp in child processes.
# The built wheel is kept in ~/.cache/lowbit/wheels under a key of version +
# CMake arguments, so a later run with the same flags installs in seconds and a
# wheel built with other flags is never reused.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LOWBIT_VENV:-$root/.venv}"
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check -q)
version="0.3.36"

base_flags="sse4_2 avx avx2 bmi2 fma f16c"
avx512_flags="avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi avx512_vnni avx512_bf16"
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has_all() { for f in $1; do [[ "$cpu_flags" == *" $f "* ]] || return 1; done; }

isa="${LOWBIT_LLAMACPP_ISA:-}"
if [ -z "$isa" ]; then
    if has_all "$base_flags $avx512_flags"; then isa=avx512; else isa=avx2; fi
fi
common="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
case "$isa" in
    avx512) required="$base_flags $avx512_flags"
            isa_args="$common -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" ;;
    avx2)   required="$base_flags"
            isa_args="$common -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF" ;;
    *) echo "setup_interop.sh: LOWBIT_LLAMACPP_ISA=$isa is not a known level; use avx512 or avx2" >&2; exit 2 ;;
esac
if ! has_all "$required"; then
    echo "setup_interop.sh: this CPU lacks flags that level $isa needs ($required); use LOWBIT_LLAMACPP_ISA=avx2" >&2
    exit 2
fi
targets="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF"
cmake_args="$isa_args $targets ${LOWBIT_LLAMACPP_EXTRA_CMAKE_ARGS:-}"
key="$(printf '%s\n%s\n' "$version" "$cmake_args" | sha256sum | cut -c1-16)"
cache="${LOWBIT_WHEEL_CACHE:-$HOME/.cache/lowbit/wheels}/llama-cpp-python-$version-$isa-$key"
record="$venv/llama_cpp_build.json"

"${pip[@]}" install "diskcache>=5.6.1" "jinja2>=2.11.3"
if [ -f "$record" ] && grep -q "\"key\": \"$key\"" "$record" && "$py" -c "import llama_cpp" 2>/dev/null; then
    echo "llama-cpp-python $version ($isa build $key) already installed"
    exit 0
fi
if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    mkdir -p "$cache.partial"
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "${pip[@]}" wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$cache.partial" "llama-cpp-python==$version"
    rm -rf "$cache" && mv "$cache.partial" "$cache"
fi
"${pip[@]}" install --no-deps --force-reinstall "$cache"/llama_cpp_python-*.whl
printf '{"version": "%s", "isa": "%s", "key": "%s", "required_cpu_flags": "%s", "cmake_args": "%s"}\n' \
    "$version" "$isa" "$key" "$required" "$cmake_args" > "$record"
"$py" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, '($isa build)')"
