# cotap inference server. The container runs `cotap serve` exactly as the README's first command
# does; COTAP_HOST=0.0.0.0 makes it reachable from outside the container. Every setting is an
# environment variable COTAP_<NAME> (see docs/server.md), e.g. COTAP_MODELS=name=/bundles/name.
#
#   GPU (default): docker build -t cotap:gpu .
#   CPU:           docker build -t cotap:cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
FROM python:3.11-slim

# torch first, as the README does: PyPI's Linux wheel is the CUDA build (its CUDA libraries come as
# pip packages; the NVIDIA container toolkit supplies the driver). TORCH_INDEX picks another build.
ARG TORCH_INDEX=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    COTAP_HOST=0.0.0.0 \
    COTAP_PORT=8000

WORKDIR /opt/cotap
RUN if [ -n "$TORCH_INDEX" ]; then pip install -q torch==2.13.0 --index-url "$TORCH_INDEX"; \
    else pip install -q torch==2.13.0; fi

COPY pyproject.toml README.md requirements.lock ./
COPY core core
COPY training training
COPY export export
COPY server server
COPY clients clients
COPY cli cli
# the versions CI tested and pip-audit checked (requirements.lock), not whatever is newest today
RUN pip install -q -c requirements.lock '.[serve,train]' && cotap --version

RUN useradd --create-home --uid 10001 cotap
USER cotap
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import os, sys, urllib.request; port = os.environ.get('COTAP_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health/ready', timeout=2).status == 200 else 1)"
# SIGTERM drains (stop admitting, finish in-flight, exit 0) within COTAP_DRAIN_TIMEOUT_S (30 s) + ~1 s.
# Give the container longer than that before SIGKILL: `docker stop -t 40` (docker's default is
# 10 s), compose's stop_grace_period (40 s in docker-compose.yml), Kubernetes'
# terminationGracePeriodSeconds (default 30 s: raise it, or lower COTAP_DRAIN_TIMEOUT_S).
STOPSIGNAL SIGTERM
CMD ["cotap", "serve"]
