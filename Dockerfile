# influence-service: one image for the API and the workers.
# CPU torch by default; for CUDA:  docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    INFLUENCE_DATA_DIR=/data

WORKDIR /srv
# torch first, from the chosen index, so the project install below keeps that build.
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0
COPY pyproject.toml README.md ./
COPY app app
COPY worker worker
COPY influence influence
COPY models models
RUN pip install --extra-index-url "$TORCH_INDEX" . \
    && useradd --create-home --uid 10001 influence \
    && mkdir -p /data && chown influence /data
USER influence
VOLUME ["/data"]
EXPOSE 8000

# The API; compose runs the workers from the same image with `influence-service worker`.
CMD ["influence-service", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
