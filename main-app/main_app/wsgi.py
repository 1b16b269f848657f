"""WSGI entry point: `gunicorn --config python:main_app.gunicorn_conf main_app.wsgi:app`."""

import logging
import os

from main_app.api import create_app

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO").upper(),
    format="%(asctime)s %(levelname)s [main-app %(process)d] %(name)s: %(message)s",
)
# pika logs every failed connect as an error; the publisher logs its own, single warning.
logging.getLogger("pika").setLevel(logging.CRITICAL)

app = create_app()
