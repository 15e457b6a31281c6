# The fleet's HTTP gateway image (`python -m producer serve`): the shared core and the producer,
# every dependency at the version of the lockfile requirements/producer.txt (scripts/lock). No
# torch, no GPU: the gateway only puts jobs in line and reads their state and images.
#
#   docker build -f docker/gateway.Dockerfile -t diffusion-fleet-gateway .
#
# Build argument:
#   BASE_IMAGE  an image with python (3.11+) and pip as `python` / `pip`; default
#               python:3.11-slim.
#
# No secrets here: credentials and every FLEET_* setting come from the environment at run time
# (docker-compose.yml, .env). .dockerignore keeps .env and local files out.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Every dependency at the lockfile's versions, the ones CI tests (--no-deps: nothing is resolved
# here). Before the sources, so a code change does not reinstall them.
COPY requirements/producer.txt ./requirements/
RUN pip install --no-deps -r requirements/producer.txt

COPY pyproject.toml README.md ./
# The gateway needs the shared core and the producer; the worker stays out of the image.
COPY fleet ./fleet
COPY producer ./producer
# The project itself, --no-deps as well; `pip check` proves the pins and the project fit.
RUN pip install --no-deps . \
    && pip check \
    && python -c "import producer.gateway.app, producer.cli"

RUN useradd --create-home --uid 10001 --user-group fleet
USER fleet

EXPOSE 8000
# 200 from GET /healthz once Redis and S3 answer; there is no curl in the image.
HEALTHCHECK --interval=15s --timeout=10s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=5)"]

# The documented gateway command; docker-compose.yml runs the same.
CMD ["python", "-m", "producer", "serve", "--host", "0.0.0.0", "--port", "8000"]
