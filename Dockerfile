# specproxy: speculative prompt caching in front of Anthropic's Messages API.
#
#   docker build -t specproxy .
#   docker run --rm -p 8787:8787 specproxy                      # upstream: the real API
#   docker run --rm -p 8787:8787 -e SPECPROXY_LOG_FORMAT=json specproxy --upstream http://sim:8790
#
# Every setting is also a SPECPROXY_* variable (see config/specproxy.toml); extra arguments are
# appended to `specproxy serve --host 0.0.0.0`. Clients keep sending their own API key.

# --- build: a wheel of the package, nothing else ----------------------------------------------------
FROM python:3.11-slim AS build
WORKDIR /src
# README.md* : the package metadata reads it when present.
COPY pyproject.toml README.md* ./
COPY specproxy ./specproxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime: the wheel and its runtime dependencies (no demo or test extras) -----------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 specproxy \
 && useradd --system --uid 10001 --gid specproxy --no-create-home --shell /usr/sbin/nologin specproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# A config file mounted at /app/config/specproxy.toml is read (or point SPECPROXY_CONFIG at one).
WORKDIR /app
USER 10001:10001
EXPOSE 8787
# slim has no curl: ask /healthz with the interpreter that is there anyway.
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('SPECPROXY_PORT', '8787'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["specproxy", "serve", "--host", "0.0.0.0"]
