#!/usr/bin/env bash
# Developer build: compiles normlab._core into build/dev and drops it next to the Python
# sources, so `PYTHONPATH=python python -m pytest` runs the working tree without installing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build/dev"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DNORMLAB_BUILD_PYTHON=ON \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$(command -v python)" "$@" > /dev/null
cmake --build "$build" --target _core
cp "$build"/_core*.so "$root/python/normlab/"
