# syntax=docker/dockerfile:1
#
# keygate container image.
#
#   docker build -t keygate .
#   docker run -e KEYGATE_ADMIN_TOKEN -p 8080:8080 -p 127.0.0.1:8081:8081 keygate
# (-e NAME alone passes the exported variable, off docker's command line and `ps`).
#
# The default config (/etc/keygate/config.yaml, from deploy/config.yaml) listens on 0.0.0.0 for
# both the proxy (8080) and the admin API (8081, so Prometheus and probes can reach it: publish
# it only on a private network) and uses $KEYGATE_REDIS_URL, falling back to the embedded Redis
# in /var/lib/keygate. Mount your own config over /etc/keygate/config.yaml.
#
# HTTPS listeners: mount a folder holding the certificate and key read-only, name them in the
# config (server.tls / admin.tls); keygate runs as uid 10001, which must be able to read them.
# Not certbot's live/ folder: its files are links into ../../archive, which lead nowhere in the
# container, and its key is root's alone. Have certbot copy them at each issue and renewal, and
# reload keygate (`docker kill -s HUP`, no restart), e.g.
#   certbot ... --deploy-hook 'install -D -m 0444 "$RENEWED_LINEAGE/fullchain.pem" /etc/keygate-tls/fullchain.pem && install -D -o 10001 -m 0400 "$RENEWED_LINEAGE/privkey.pem" /etc/keygate-tls/privkey.pem && docker kill -s HUP keygate'
#   docker run --name keygate ... -v /etc/keygate-tls:/etc/keygate-tls:ro keygate
#   server: {tls: {cert_file: /etc/keygate-tls/fullchain.pem, key_file: /etc/keygate-tls/privkey.pem}}
# With admin.tls set, the HEALTHCHECK below must use https:// (and an unverified context, or
# the CA).

ARG PYTHON_VERSION=3.12
# Optional extras: --build-arg KEYGATE_EXTRAS="[otel]" adds OTLP span export (tracing:).
ARG KEYGATE_EXTRAS=""

# --- builder: every wheel keygate needs, built or fetched once ----------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder

# Compilers only for dependencies that lack a wheel for this platform; never in the final stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml constraints.txt README* ./
COPY gateway ./gateway
ARG KEYGATE_EXTRAS
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt ".${KEYGATE_EXTRAS}"

# --- runtime: Python, keygate's wheels, nothing to build with -----------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm

LABEL org.opencontainers.image.title="keygate" \
      org.opencontainers.image.description="Authenticating reverse proxy for API keys" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The wheels are bind-mounted from the builder, so they never become a layer of this image.
# Versions are pinned by the builder: --no-index installs exactly the wheels it resolved.
ARG KEYGATE_EXTRAS
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "keygate${KEYGATE_EXTRAS}" \
    && groupadd --system --gid 10001 keygate \
    && useradd --system --uid 10001 --gid keygate --home-dir /var/lib/keygate \
       --shell /usr/sbin/nologin keygate \
    && mkdir -p /etc/keygate /var/lib/keygate \
    && chown keygate:keygate /var/lib/keygate \
    && chmod 700 /var/lib/keygate

COPY deploy/config.yaml /etc/keygate/config.yaml

USER 10001:10001
WORKDIR /var/lib/keygate
VOLUME ["/etc/keygate", "/var/lib/keygate"]

# 8080: proxy listener (public). 8081: admin API, /healthz, /readyz, /metrics (private).
EXPOSE 8080 8081

# Set at runtime (never baked in): the operator bearer token for the admin API.
# ENV KEYGATE_ADMIN_TOKEN=   <- pass with -e KEYGATE_ADMIN_TOKEN / a Secret

# Straight to the loopback, never through a proxy: Docker copies the client's proxy settings
# (HTTP_PROXY, NO_PROXY) into containers, and urllib's NO_PROXY matching takes neither
# 127.0.0.0/8 nor localhost to cover 127.0.0.1, so urlopen sent the check to the proxy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; o = u.build_opener(u.ProxyHandler({})); sys.exit(0 if o.open('http://127.0.0.1:8081/healthz', timeout=4).status == 200 else 1)"]

# On SIGTERM keygate's stop takes up to 83 s: KEYGATE_DRAIN_SECONDS (default 30) for requests
# in flight, then up to 53 s more (docs/operations.md, Stopping); `docker stop` SIGKILLs after
# 10 s unless told otherwise: `docker run --stop-timeout 90` (or `docker stop -t 90`; compose:
# stop_grace_period, as deploy/docker-compose.yml sets). Raise the drain, raise these with it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["keygate"]
CMD ["serve", "--config", "/etc/keygate/config.yaml"]
