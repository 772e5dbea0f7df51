# Production image of the gateway: external Redis (GATEWAY_REDIS_URL), non-root user.
# Build: docker build -t gateway .   Run: docker run -e GATEWAY_REDIS_URL=redis://redis:6379/0 -p 8080:8080 gateway
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 procps \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/gateway --uid 10001 gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config /etc/gateway
USER gateway
WORKDIR /var/lib/gateway
ENV GATEWAY_CONFIG=/etc/gateway/gateway.toml \
    GATEWAY_SERVER_LISTEN=0.0.0.0:8080 \
    GATEWAY_SERVER_DATA_DIR=/var/lib/gateway/data \
    GATEWAY_VMS_DRIVER=process
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/openapi.json', timeout=2)"
ENTRYPOINT ["gateway"]
CMD ["serve"]
