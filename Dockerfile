FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=config.settings.base

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        gdal-bin libgdal-dev libgeos-dev binutils libproj-dev libpq-dev build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .
RUN python manage.py collectstatic --noinput -v0

RUN useradd --system --uid 10001 --home-dir /app app \
    && mkdir -p /var/lib/dispatch/proofs && chown -R app /var/lib/dispatch
USER app
# Proof-of-delivery photos and signatures (local storage): a volume in docker-compose.yml
ENV PROOF_MEDIA_ROOT=/var/lib/dispatch/proofs

EXPOSE 8000
CMD ["uvicorn", "config.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--no-access-log", "--http", "common.httpprotocol:HttpToolsProtocol", "--ws", "common.wsprotocol:WebSocketProtocol", "--ws-max-size", "65536"]
