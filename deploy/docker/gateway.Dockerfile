# The Meridian gateway: HTTP/3 (QUIC) and HTTP/1.1 listeners, auth, limits, the L2 cache, routing.
# Build it with `make gateway-image` (deploy/docker/build_image.sh prepares the context: the meridian
# wheel and its dependencies' wheels, fetched on the host, so the build itself needs no network).
# Run: podman run --init --network=host -v ./topology.yaml:/etc/meridian/topology.yaml:ro \
#        -v ./tls:/etc/meridian/tls:ro localhost/meridian-gateway
# The topology names the TLS files (absolute paths) and the zones; keys live in it as hashes only.
ARG BASE_IMAGE=python:3.11-slim

# Stage 1: a virtualenv with the gateway (the meridian wheel's own dependencies: no ML runtime).
FROM ${BASE_IMAGE} AS runtime
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/meridian \
    && /opt/meridian/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels meridian==0.1.0 \
    && /opt/meridian/bin/python -c "import aioquic, aiohttp, grpclib, tritonclient.grpc, uvloop, gateway.server"

# Final stage: the virtualenv only, run as an unprivileged user.
FROM ${BASE_IMAGE}
RUN useradd --no-log-init --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin meridian
COPY --from=runtime /opt/meridian /opt/meridian
ENV PATH=/opt/meridian/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# HTTP/1.1, HTTP/3 (UDP), HTTP/1.1 over TLS: the ports of the topology's listeners.
EXPOSE 8080/tcp 8443/udp 8444/tcp
# Liveness of the HTTP/1.1 listener the topology names.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "deploy.healthcheck", "--topology", "/etc/meridian/topology.yaml"]
# The gateway drains on SIGTERM: readiness fails, HTTP/3 GOAWAY, requests in flight finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["meridian", "gateway"]
CMD ["--topology", "/etc/meridian/topology.yaml"]
