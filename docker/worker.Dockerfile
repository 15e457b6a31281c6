# The fleet's worker image: the project with its worker extra and a pinned torch build, every
# other dependency at the version of the lockfile requirements/worker.txt (scripts/lock).
#
#   docker build -f docker/worker.Dockerfile -t diffusion-fleet-worker .
#
# Build arguments:
#   BASE_IMAGE       an image with python (3.10+) and pip as `python` / `pip`; default
#                    python:3.11-slim. The CUDA runtime comes with the torch wheel, and the GPU
#                    driver is mounted by the NVIDIA container toolkit at run time, so no CUDA
#                    base image is needed.
#   TORCH_SPEC       the torch requirement, always pinned (default torch==2.13.0). On Linux x86_64
#                    the default index's torch wheel is the CUDA build (it pulls its nvidia-*
#                    CUDA libraries, several GB).
#   TORCH_INDEX_URL  empty: the default index. For another build, PyTorch's own wheel index, e.g.
#                    https://download.pytorch.org/whl/cu128 (a given CUDA version) or
#                    https://download.pytorch.org/whl/cpu (a small CPU-only image).
#
# No secrets here: credentials, the model and every FLEET_* setting come from the environment
# at run time (docker-compose.yml, .env). .dockerignore keeps .env and local files out.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    FLEET_SPOOL_DIR=/spool

# torch first, in a layer of its own: it is the big one, and pinning it here means the
# project's unpinned `torch>=...` can never pull another build. It comes with its own
# dependencies (for the CUDA build its nvidia-* libraries and triton); the lockfile has none.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

WORKDIR /app
# Then every other dependency at the lockfile's versions, the ones CI tests (scripts/lock writes
# requirements/worker.txt; --no-deps: nothing is resolved here). Before the sources, so a code
# change does not reinstall them.
COPY requirements/worker.txt ./requirements/
RUN pip install --no-deps -r requirements/worker.txt

COPY pyproject.toml README.md ./
# The worker needs the shared core and itself; the producer's clients stay out of the image.
COPY fleet ./fleet
COPY worker ./worker
# The project itself, --no-deps as well; `pip check` proves torch, the pins and the project fit.
RUN pip install --no-deps . \
    && pip check \
    && python -c "import worker.app, worker.tasks, worker.runtime"

# A non-root user owns the model cache and the spool; named volumes mounted there start with
# this ownership.
RUN useradd --create-home --uid 10001 --user-group fleet \
    && mkdir -p /cache/huggingface /spool \
    && chown -R fleet:fleet /cache /spool
USER fleet

# SIGTERM = Celery's warm shutdown (the running job finishes); give `docker stop` time for it.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "worker", "check"]

# The documented worker command; docker-compose.yml gives each service its own queue and node.
CMD ["celery", "-A", "worker.app", "worker", "--pool", "prefork", "--concurrency", "1", \
     "--queues", "fleet", "--hostname", "worker@%h", "--loglevel", "INFO", \
     "--without-gossip", "--without-mingle"]
