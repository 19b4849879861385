# The Meridian edge node: the gRPC edge worker (embeddings + small-LM generation on ONNX Runtime).
# Build it with `make edge-image` (deploy/docker/build_image.sh prepares the context: wheels
# fetched on the host, the exported models, the meridian wheel), so the build itself needs no network.
# Run: podman run --init --network=host -e MERIDIAN_ZONE=zone-b \
#        -v ./topology.yaml:/etc/meridian/topology.yaml:ro localhost/meridian-edge
ARG BASE_IMAGE=python:3.11-slim

# Stage 1: a virtualenv with the worker's runtime dependencies, from the context's wheels only.
FROM ${BASE_IMAGE} AS runtime
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/meridian \
    && /opt/meridian/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        -r /tmp/wheels/edge-requirements.txt \
    && /opt/meridian/bin/pip install --no-cache-dir --no-index --no-deps /tmp/wheels/meridian-0.1.0-py3-none-any.whl \
    && /opt/meridian/bin/python -c "import onnxruntime, tokenizers, jinja2, grpclib, yaml, edge.server"

# Stage 2: the model artefacts, exported and verified against PyTorch by `meridian models` on the
# build host (torch stays out of the image); only what the runtime reads is copied.
FROM ${BASE_IMAGE} AS models
COPY models/ /models/

# Final stage: runtime + models, run as an unprivileged user.
FROM ${BASE_IMAGE}
RUN useradd --no-log-init --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin meridian
COPY --from=runtime /opt/meridian /opt/meridian
COPY --from=models /models /models
COPY edge-topology.yaml /etc/meridian/topology.yaml
ENV PATH=/opt/meridian/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    HF_HUB_OFFLINE=1 \
    MERIDIAN_CACHE=/models \
    MERIDIAN_TOPOLOGY=/etc/meridian/topology.yaml \
    MERIDIAN_ZONE=edge
USER 10001:10001
EXPOSE 50051
# grpc.health.v1 on the worker's own address and port (read from the same topology and environment).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "edge.healthcheck"]
# The worker drains on SIGTERM: NOT_SERVING first, in-flight requests finish, then exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["meridian", "edge"]
