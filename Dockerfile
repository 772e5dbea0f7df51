# Production image of the gateway: external Redis (GATEWAY_REDIS_URL), non-root, JSON logs on stderr.
#   docker build -t gateway .                                   (add --build-arg CHROMIUM=1 for browser
#                                                                instances' default image)
#   docker run -e GATEWAY_REDIS_URL=redis://redis:6379/0 -p 8080:8080 gateway
# The admin listener (/metrics, /healthz, /readyz) is on 9091: publish it to your monitoring network only.
# config/compose.yaml runs it with Redis.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ARG CHROMIUM=0
# iproute2 and procps: the VM drivers' host tools; runc, nftables, mmdebstrap and e2fsprogs: the netns
# driver's containers, host firewall, images and writable layers; xfsprogs (and e2fsprogs): volumes;
# chromium: the browser instances (process).
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 procps runc nftables mmdebstrap e2fsprogs xfsprogs \
    && if [ "$CHROMIUM" = "1" ]; then apt-get install -y --no-install-recommends chromium; fi \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/gateway --uid 10001 gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/gateway.toml /etc/gateway/gateway.toml
USER gateway
WORKDIR /var/lib/gateway
ENV GATEWAY_CONFIG=/etc/gateway/gateway.toml \
    GATEWAY_SERVER_LISTEN=0.0.0.0:8080 \
    GATEWAY_SERVER_DATA_DIR=/var/lib/gateway/data \
    GATEWAY_ADMIN_LISTEN=0.0.0.0:9091 \
    GATEWAY_LOG_FORMAT=json \
    GATEWAY_VMS_DRIVER=process \
    PYTHONUNBUFFERED=1
EXPOSE 8080 9091
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9091/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve"]
