# The image G.O.D's tournament builds from this repository (docs: gradients-protocol.md §10.2):
#   docker build -f dockerfiles/standalone-text-trainer.dockerfile .
# It runs offline with the model and data in /cache and writes to /app/checkpoints.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 MINER_STATE_DIR=/app/checkpoints/.miner
WORKDIR /workspace/miner
COPY pyproject.toml README.md ./
COPY serve_app ./serve_app
COPY cluster ./cluster
COPY tuning ./tuning
COPY trainers ./trainers
RUN pip install --no-cache-dir .
ENTRYPOINT ["python", "-m", "trainers.tournament"]
