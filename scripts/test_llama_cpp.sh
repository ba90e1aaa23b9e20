#!/usr/bin/env bash
# make test-llama-cpp: llama-cpp-python compiled from its sdist (requirements/peers-llama-cpp.txt)
# into build/llama-cpp/site, with gguf-py from the same llama.cpp tree, then tests/test_llama_cpp.py
# with the project's venv: llama.cpp's converter and mtmd beside the engine's image path. Skips,
# saying why, where it cannot be built.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:?the project venv python}
DIR=build/llama-cpp
# AVX2 and FMA, which every x86 machine these tests run on has, and not llama.cpp's default
# -march=native: on the AMX Xeon that build died in its first prompt (docs/benchmarks.md). Give the
# benchmark's build its CPU's instruction sets here (LLAMA_CPP_CMAKE_ARGS, see docs/benchmarks.md).
CMAKE_ARGS=${LLAMA_CPP_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}
export CMAKE_ARGS
stamp=$({ cat requirements/peers-llama-cpp.txt; echo "$CMAKE_ARGS"; } | sha256sum | cut -c1-16)
version=$(sed -n 's/^llama-cpp-python==//p' requirements/peers-llama-cpp.txt)
tree="$DIR/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -f "$DIR/ready.$stamp" ]; then
  rm -rf "$DIR"
  mkdir -p "$DIR"
  echo "make test-llama-cpp: compiling llama-cpp-python $version into $DIR (minutes, once; $CMAKE_ARGS)"
  started=$SECONDS
  {
    "$PYTHON" -m pip download -q --no-binary :all: --no-deps -d "$DIR" "llama-cpp-python==$version" &&
      tar -xzf "$DIR/llama_cpp_python-$version.tar.gz" -C "$DIR" &&
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PYTHON" -m pip install -q --no-deps --target "$DIR/site" \
        "$DIR/llama_cpp_python-$version.tar.gz" "$tree/gguf-py" \
        $(grep -v -e '^#' -e '^llama-cpp-python' requirements/peers-llama-cpp.txt)
  } > build/llama-cpp.log 2>&1 ||
    { echo "make test-llama-cpp: SKIPPED: could not build llama-cpp-python (see build/llama-cpp.log)"; exit 0; }
  PYTHONPATH="$DIR/site" "$PYTHON" -c "from llama_cpp import mtmd_cpp; import gguf" >> build/llama-cpp.log 2>&1 ||
    { echo "make test-llama-cpp: SKIPPED: llama-cpp-python does not import here (see build/llama-cpp.log)"; exit 0; }
  echo "make test-llama-cpp: built in $((SECONDS - started)) s"
  touch "$DIR/ready.$stamp"
fi
PYTHONPATH="$(pwd)/$DIR/site${PYTHONPATH:+:$PYTHONPATH}" INTERNVL_LLAMA_CPP_SOURCE="$(pwd)/$tree" \
  "$@" tests/test_llama_cpp.py
