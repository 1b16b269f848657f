"""main-app's Flask application: create_app wires the parts (nothing else happens here).

views.py has the routes, submission.py what submitting a job takes, hooks.py the request
metrics and problem+json error answers, broker.py the publisher, auth.py the tokens.
"""

import orjson
from flask import Flask

from jobs_contract import JOB_TYPES, JobStore
from jobs_contract.catalog import RequestValidator
from main_app import hooks, metrics, views
from main_app.auth import TokenAuthenticator
from main_app.broker import Publisher
from main_app.config import Settings
from main_app.openapi import openapi_document
from main_app.submission import StoreRecorder, Submissions


class JobsApp(Flask):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sync_functions: dict = {}

    def ensure_sync(self, func):
        # Flask asks inspect, for every view and hook of every request, whether it is a coroutine
        # function (~10 µs a request here); the answer never changes for a function.
        sync = self._sync_functions.get(func)
        if sync is None:
            sync = self._sync_functions[func] = super().ensure_sync(func)
        return sync


def create_app(settings: Settings | None = None, store: JobStore | None = None,
               publisher: Publisher | None = None) -> Flask:
    settings = settings or Settings.from_env()
    store = store or JobStore.from_url(settings.redis_url, job_ttl_seconds=settings.job_ttl_seconds,
                                       idempotency_ttl_seconds=settings.idempotency_ttl_seconds)
    publisher = publisher or Publisher(settings.rabbitmq_url, declare_topology=settings.declare_topology,
                                       stall_seconds=settings.publish_timeout_seconds,
                                       recorder=StoreRecorder(store)).start()
    metrics.initialise(JOB_TYPES)

    app = JobsApp(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["job_store"] = store
    app.extensions["publisher"] = publisher
    app.extensions["jobs_api"] = views.ApiContext(
        authenticator=TokenAuthenticator(settings.api_tokens, disabled=settings.auth_disabled),
        submissions=Submissions(store, publisher, RequestValidator(settings.limits),
                                settings.publish_timeout_seconds),
        store=store,
        publisher=publisher,
        openapi=orjson.dumps(openapi_document(settings)),
    )
    hooks.register(app)
    app.register_blueprint(views.jobs)
    app.register_blueprint(views.probes)
    return app
