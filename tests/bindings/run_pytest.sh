#!/usr/bin/env bash
# run_pytest.sh MODE PYTHON LIBRARY SRCDIR [pytest arguments...]
# The Python binding's pytest suite against LIBRARY (the just-built libmoekit). MODE cpu runs the
# host-side tests (marker "not gpu"), MODE gpu the ones comparing against PyTorch on a device.
# Exit 77 (SKIP in meson) when pytest, or for gpu torch with a CUDA device, is missing: a skip is
# reported as one, never as a pass.
set -u
mode=$1 python=$2 lib=$3 src=$4
shift 4
if ! "$python" -c "import pytest" >/dev/null 2>&1; then
  echo "SKIP: pytest is not installed for $python (pip install pytest, or apt-get install python3-pytest)"
  exit 77
fi
case $mode in
  cpu) marker="not gpu" ;;
  gpu)
    marker="gpu"
    if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
      echo "SKIP: the GPU tests need torch with a CUDA device"
      exit 77
    fi ;;
  *) echo "run_pytest.sh: MODE must be cpu or gpu, got '$mode'" >&2; exit 2 ;;
esac
export MOEKIT_LIB=$lib MOEKIT_INCLUDE_DIR=$src/include PYTHONDONTWRITEBYTECODE=1
cd "$src/python" || exit 1
exec "$python" -m pytest -m "$marker" -q "$@"
