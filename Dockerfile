# One image for the Prefect worker, the Dask scheduler and the Dask workers (same code, same versions).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY deepercluster ./deepercluster
COPY flows ./flows
COPY tasks ./tasks
COPY deployments ./deployments
RUN pip install --no-cache-dir ".[gpu]" s3fs
ENV DEEPERCLUSTER_HOME=/app PREFECT_SERVER_ANALYTICS_ENABLED=false
