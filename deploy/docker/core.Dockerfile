# The Meridian core: NVIDIA's tritonserver (from the nvidia-pytriton wheel) serving our MoE engine
# through its python backend, one checkpoint per server.
# Build it with `make core-image` (deploy/docker/build_image.sh prepares the context: the wheels,
# fetched on the host, so the build itself needs no network). Checkpoints are mounted, not baked in.
# Run: podman run --init --network=host -v ~/.cache/meridian/core:/models/core:ro localhost/meridian-core \
#        --checkpoint /models/core/meridian-moe-mini --device cpu
# On a GPU node (the Kubernetes manifests): an image built with the CUDA torch, the NVIDIA container
# runtime, and `--device cuda`.
ARG BASE_IMAGE=python:3.11-slim

# Stage 1: a virtualenv with the engine's runtime dependencies, from the context's wheels only.
FROM ${BASE_IMAGE} AS runtime
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/meridian \
    && /opt/meridian/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        -r /tmp/wheels/core-requirements.txt \
    && /opt/meridian/bin/pip install --no-cache-dir --no-index --no-deps /tmp/wheels/meridian-0.1.0-py3-none-any.whl \
    && /opt/meridian/bin/python -c "import torch, safetensors, tokenizers, pytriton, core.triton.server"

# Final stage: the virtualenv, and a writable work directory for the model repository, unprivileged.
FROM ${BASE_IMAGE}
RUN useradd --no-log-init --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin meridian \
    && mkdir -p /var/run/meridian && chown 10001:10001 /var/run/meridian
COPY --from=runtime /opt/meridian /opt/meridian
ENV PATH=/opt/meridian/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1
USER 10001:10001
# Triton's HTTP (health, KServe v2), gRPC (what the gateway speaks) and metrics ports.
EXPOSE 8000 8001 8002
# Ready once the engine is built and the checkpoint loaded (a large one takes minutes).
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-m", "deploy.healthcheck", "http://127.0.0.1:8000/v2/health/ready"]
# tritonserver stops taking requests on SIGTERM and finishes those in flight (--exit-timeout-secs).
STOPSIGNAL SIGTERM
ENTRYPOINT ["meridian", "core", "--host", "0.0.0.0", "--workdir", "/var/run/meridian"]
CMD ["--checkpoint", "/models/core/meridian-moe-mini"]
