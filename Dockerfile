# syntax=docker/dockerfile:1
# resilient-ambassador container image.
#
#   docker build -t resilient-ambassador:0.1.0 .
#   docker run --rm -p 8000:8000 resilient-ambassador:0.1.0 \
#       run --listen 0.0.0.0:8000 --upstream https://jsonplaceholder.typicode.com
#   docker run --rm -p 8000:8000 -v "$PWD/ambassador.yaml:/etc/resilient-ambassador/config.yaml:ro" \
#       resilient-ambassador:0.1.0
#
# Inside a container a listener must bind 0.0.0.0 (not 127.0.0.1) for `-p` to reach it.
#
# Kubernetes manifests using it: k8s/ (see docs/kubernetes.md).

# --- builder: wheels for the package and every dependency ------------------------------------
# Python 3.12 on Debian bookworm, slim variant. The tag says what it is; the digest makes every
# build start from the same bytes (check it when bumping: `docker buildx imagetools inspect
# python:3.12.12-slim-bookworm`). Written out in both FROM lines, not as an ARG, so linters see
# the pin; bump both together.
FROM python:3.12.12-slim-bookworm@sha256:593bd06efe90efa80dc4eee3948be7c0fde4134606dd40d8dd8dbcade98e669c AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY resilient_ambassador ./resilient_ambassador
# With the `otlp` extra: OTEL_TRACES_EXPORTER=otlp works in the image without another layer.
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels ".[otlp]"

# --- runtime: the wheels installed into a venv; no compiler, no wheel files, no pip cache ----
FROM python:3.12.12-slim-bookworm@sha256:593bd06efe90efa80dc4eee3948be7c0fde4134606dd40d8dd8dbcade98e669c
LABEL org.opencontainers.image.title="resilient-ambassador" \
      org.opencontainers.image.description="Ambassador sidecar that shields apps from flaky, slow, rate-limited external APIs" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# The wheels are bind-mounted from the builder for this one step, so they never become a layer.
# The venv has no pip of its own: the base image's pip installs into it (--python).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/venv \
    && python -m pip --python /opt/venv/bin/python install --no-cache-dir --no-index \
       --find-links=/wheels "resilient-ambassador[otlp]"

# Any numeric non-root UID works (Kubernetes' runAsNonRoot can only verify a numeric one);
# 10001 stays clear of the host's system and login users. The daemon writes nothing to disk,
# so the root filesystem can be mounted read-only.
USER 10001:10001

# 8000: the data listener (HTTP). 9901: the admin listener (/healthz, /readyz, /stats, /config).
EXPOSE 8000 9901

# Liveness for plain Docker (Kubernetes ignores HEALTHCHECK and uses the probes in k8s/).
# http.client rather than urllib: it ignores HTTP_PROXY, which must not apply to 127.0.0.1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import http.client as h, sys; c = h.HTTPConnection('127.0.0.1', 9901, timeout=2); c.request('GET', '/healthz'); sys.exit(c.getresponse().status != 200)"]

# Exec form, no shell in between: the daemon is PID 1 and receives SIGTERM itself; it drains
# (drain.grace_period) and exits 0. The admin listener defaults to 127.0.0.1:9901, which only
# the container itself can reach; the kubelet probes the pod IP and `docker run -p` forwards to
# the container's interface, so listen on 0.0.0.0 here. Keep 9901 out of every Service.
ENTRYPOINT ["resilient-ambassador"]
CMD ["run", "--config", "/etc/resilient-ambassador/config.yaml", "--admin", "0.0.0.0:9901"]
