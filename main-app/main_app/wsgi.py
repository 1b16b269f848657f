"""WSGI entry point: `gunicorn --config python:main_app.gunicorn_conf main_app.wsgi:app`."""

import os

from jobs_contract.logs import configure_logging
from main_app.api import create_app

configure_logging("main-app", os.environ.get("LOG_LEVEL", "INFO"))

app = create_app()
