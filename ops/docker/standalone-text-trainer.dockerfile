# The image G.O.D's tournament builds from this repository (gradients-protocol.md §13; the
# validator looks for ops/docker/standalone-text-trainer.dockerfile first, then dockerfiles/):
#   docker build -f ops/docker/standalone-text-trainer.dockerfile .
# The build has internet; the run does not: the model and data are in the read-only /cache, the
# model goes to /app/checkpoints/<task_id>/<expected_repo_name>. Nothing phones home at run time:
# Ray usage stats off, the Hugging Face libraries offline, no W&B client installed.
FROM python:3.12-slim

# gcc: Triton compiles its launchers at run time (torch.compile, DeepSpeed); no other system package.
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 RAY_DISABLE_DOCKER_CPU_WARNING=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 \
    HOME=/tmp/home XDG_CACHE_HOME=/tmp/cache HF_HOME=/tmp/hf TRITON_CACHE_DIR=/tmp/triton \
    MINER_STATE_DIR=/tmp/miner

WORKDIR /workspace/miner
COPY ops/docker/requirements.txt ./requirements.txt
# torch's CUDA 12.8 build (the validator's own images are cu128: drivers >= 570; PyPI's 2.11 wheel is
# CUDA 13, which needs >= 580), then the rest at the same pins (the torch pin is already satisfied)
RUN pip install --index-url https://download.pytorch.org/whl/cu128 "$(grep '^torch==' requirements.txt)" \
    && pip install -r requirements.txt
COPY pyproject.toml README.md LICENSE ./
COPY serve_app ./serve_app
COPY cluster ./cluster
COPY tuning ./tuning
COPY trainers ./trainers
# the pins above are the environment; the package itself adds no dependency resolution
RUN pip install --no-deps . && python -c "import cluster.jobs.tournament, trainers.instruct, trainers.dpo, trainers.grpo"

ENTRYPOINT ["python", "-m", "trainers.tournament"]
