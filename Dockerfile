# The image of the example services: the owner and the consumers of docker-compose.yml.
# Build context: this repository. The same image runs either service; compose picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The library first, so editing an example does not reinstall the dependencies.
COPY pyproject.toml README.md ./
COPY cachesync ./cachesync
# greenlet: SQLAlchemy's asyncio layer needs it and SQLAlchemy 2.1 no longer pulls it in.
RUN pip install '.[redis,rabbitmq,fastapi,outbox]' greenlet

COPY examples ./examples

RUN useradd --create-home --uid 10001 app && chown -R app /app
USER app

EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=10 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

CMD ["uvicorn", "examples.owner_service:app", "--host", "0.0.0.0", "--port", "8000"]
