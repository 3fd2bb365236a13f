#!/usr/bin/env bash
# Builds llama-cpp-python once with portable CPU flags and caches the wheel.
#
# Why: PyPI ships only the sdist; the default native build detects AMX on our
# Xeons and dies with SIGILL on quantised models (see DESIGN / measurements).
# pip's own wheel cache ignores CMAKE_ARGS, so we keep our own folder keyed on
# the version and the flags, and every later clone installs in seconds.
#
# Usage: build-llama-wheel.sh PYTHON   (prints the wheel path on stdout)
set -euo pipefail
py=${1:?python interpreter}
version=0.3.36
flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"
key=$(printf '%s|%s|%s' "$version" "$flags" "$("$py" -c 'import sys;print(sys.implementation.cache_tag)')" | sha256sum | cut -c1-16)
cache=${ERLLAMA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/erllama-py/wheels}/llama-cpp-python-$version-$key
mkdir -p "$cache"
wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $version (portable CPU flags, 6-10 min, once)" >&2
  tmp=$(mktemp -d "$cache/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$py" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
    -w "$tmp" "llama-cpp-python==$version" >&2
  built=$(ls "$tmp"/llama_cpp_python-*.whl)
  mv "$built" "$cache/"
  wheel=$cache/$(basename "$built")
fi
echo "$wheel"
