#!/usr/bin/env bash
# Fails when a per-target kernel object defines a weak (COMDAT) symbol outside its own
# normlab::<target> namespace: the linker keeps one such copy for every target, compiled for
# whichever CPU it happened to pick (an AVX-512 std::vector member once reached the baseline
# path this way). Usage: tools/check_target_symbols.sh BUILD_DIR
set -euo pipefail
build=${1:?build directory}
objects=$(find "$build/CMakeFiles" -path '*normlab_kernels_*' -name '*.o')
[ -n "$objects" ] || { echo "no kernel objects under $build"; exit 1; }
shared=$(for o in $objects; do nm -C "$o" | grep -E ' [WVu] ' | sed "s|^|$o: |"; done |
  grep -v -E 'normlab::(baseline|avx2|avx512|avx512bf16|neon)::|DW\.ref\.__gxx_personality_v0' || true)
if [ -n "$shared" ]; then
  echo "per-target objects define shared weak symbols:"; echo "$shared"; exit 1
fi
echo "per-target objects: no shared weak symbols ($(echo "$objects" | wc -w) objects)"
