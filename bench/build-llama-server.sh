#!/usr/bin/env bash
# Builds llama.cpp's C++ `llama-server` from the llama.cpp sources vendored in the
# llama-cpp-python 0.3.36 sdist (the same llama.cpp our engine benchmark runs through
# Python), CPU only, native ISA. Idempotent: does nothing when the binary exists.
#   bash bench/build-llama-server.sh          -> prints the path of llama-server
# Installs into $LLAMA_SERVER_HOME (default ~/.cache/arqon/llama-server/). ~10 min on 2 cores.
set -euo pipefail
VERSION=0.3.36
PREFIX=${LLAMA_SERVER_HOME:-$HOME/.cache/arqon/llama-server}
BIN=$PREFIX/bin/llama-server
JOBS=${JOBS:-2}
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$PREFIX/src"
# pip is only a downloader here (`--no-binary llama-cpp-python`, not `:all:`, which would
# also build cmake itself from source for the metadata step); a throwaway venv also gives us cmake.
TOOLS=$PREFIX/tools-venv
[ -x "$TOOLS/bin/pip" ] || python3 -m venv "$TOOLS"
CMAKE=$(command -v cmake || true)
if [ -z "$CMAKE" ]; then
    "$TOOLS/bin/pip" install -q cmake >&2
    CMAKE=$TOOLS/bin/cmake
fi
SDIST=$(ls "$PREFIX/src"/llama_cpp_python-$VERSION.tar.gz 2>/dev/null || true)
if [ -z "$SDIST" ]; then
    "$TOOLS/bin/pip" download -q --no-deps --no-binary llama-cpp-python -d "$PREFIX/src" "llama-cpp-python==$VERSION" >&2
    SDIST=$(ls "$PREFIX/src"/llama_cpp_python-$VERSION.tar.gz)
fi
SRC=$PREFIX/src/llama_cpp_python-$VERSION
[ -d "$SRC" ] || tar -xzf "$SDIST" -C "$PREFIX/src"
LLAMA=$SRC/vendor/llama.cpp
# This CPU's SIMD features one by one, never AMX (with GGML_NATIVE=ON llama.cpp's AMX
# matmul segfaulted on the AVX-512 VM of bench/runs/2026-12-01-*); LLAMA_CMAKE_ARGS overrides.
flags="-DGGML_NATIVE=OFF"
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
    avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
    if grep -qw "${pair%%:*}" /proc/cpuinfo; then flags="$flags -DGGML_${pair##*:}=ON"; fi
done
# shellcheck disable=SC2086
"$CMAKE" -S "$LLAMA" -B "$PREFIX/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF ${LLAMA_CMAKE_ARGS:-$flags} -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
"$CMAKE" --build "$PREFIX/build" --config Release --target llama-server -j "$JOBS" >&2
mkdir -p "$PREFIX/bin"
cp "$PREFIX/build/bin/llama-server" "$BIN"
echo "$BIN"
