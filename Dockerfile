# One image for the Prefect worker, the Dask scheduler and the Dask workers (same code, same versions everywhere).
# torch's Linux wheels bring their CUDA libraries; the GPU comes from docker-compose.yml's device reservations.
FROM python:3.11.13-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY deepercluster ./deepercluster
COPY flows ./flows
COPY tasks ./tasks
COPY deployments ./deployments
COPY deployments/dask.yaml /etc/dask/deepercluster.yaml
RUN pip install ".[gpu,s3]" \
 && useradd --create-home --uid 1000 deepercluster \
 && chown -R deepercluster /app
USER deepercluster
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false
