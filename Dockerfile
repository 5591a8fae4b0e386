# session-proxy container image.
#
#   docker build -t session-proxy:0.1.0 .
#   docker run --rm -p 8080:8080 -e SESSION_PROXY_INSTANCES=http://10.0.0.5:3001 session-proxy:0.1.0
#
# BASE is any Debian-like image with python3 and its venv module (3.11+). The default is the
# official slim image; where it cannot be pulled, build a local one (see scripts/smoke-podman.sh)
# and pass it: `podman build --pull=never --build-arg BASE=localhost/bookworm-py:local .`
# The same BASE is used by both stages, so the venv's interpreter link stays valid.
ARG BASE=python:3.12-slim

# --- build: a virtualenv holding the package and its dependencies ---------------------------------
FROM ${BASE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv

WORKDIR /src
# Only what `pip install .` needs (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md ./
COPY proxy/ ./proxy/
# Every dependency (uvloop, httptools, asyncpg, ...) ships binary wheels for CPython on
# x86_64/aarch64, so no compiler is needed; --prefer-binary keeps it that way. Byte-code is
# compiled here, at install time, so the read-only final image never has to write .pyc files.
# The import makes a broken package fail the build rather than the first container start.
RUN /opt/venv/bin/pip install --no-cache-dir --prefer-binary ".[tracing]" \
    && /opt/venv/bin/python -c "import proxy.cli, proxy.server, proxy.simulator" \
    && /opt/venv/bin/python -c "import opentelemetry.sdk, opentelemetry.exporter.otlp" \
    && /opt/venv/bin/session-proxy --help >/dev/null

# --- final: the interpreter from BASE, the venv, nothing else ---------------------------------------
FROM ${BASE}

LABEL org.opencontainers.image.title="session-proxy" \
      org.opencontainers.image.description="A session-aware reverse proxy for fleets of stateful WhatsApp gateway instances" \
      org.opencontainers.image.licenses="MIT"

# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER, and the passwd
# entry is there for libraries that look the user up (asyncpg's default database user).
RUN groupadd --system --gid 10001 sessionproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin sessionproxy

# Owned by root and not writable by the proxy user.
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SESSION_PROXY_HOST=0.0.0.0 \
    SESSION_PROXY_PORT=8080

USER 10001:10001
EXPOSE 8080

# Docker/podman only (Kubernetes uses the probes in k8s/). Plain urllib: no curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SESSION_PROXY_PORT', '8080'), timeout=2)"]

# `serve` runs uvicorn with uvloop and httptools; SESSION_PROXY_WORKERS sets the worker processes.
# Other commands: `docker run IMAGE migrate`, `... reconcile --dry-run`, `... simulate --port 3001`.
ENTRYPOINT ["session-proxy"]
CMD ["serve"]
