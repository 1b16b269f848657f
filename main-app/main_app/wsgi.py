"""WSGI entry point: `gunicorn --config python:main_app.gunicorn_conf main_app.wsgi:app`."""

from jobs_contract.logs import configure_logging
from jobs_contract.settings import log_level_from_env
from main_app.api import create_app

configure_logging("main-app", log_level_from_env())

app = create_app()
