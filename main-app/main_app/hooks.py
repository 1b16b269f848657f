"""What every request goes through: RED metrics per route, and errors answered as problem+json."""

import logging
import time

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from main_app import metrics
from main_app.problems import PROBLEM_JSON, Problem, RejectReason

log = logging.getLogger(__name__)

SUBMIT_ENDPOINT = "jobs.submit"  # its refusals are counted by reason


def register(app: Flask) -> None:
    app.before_request(_start_timer)
    app.teardown_request(_end_request)
    app.after_request(_observe)
    app.register_error_handler(Problem, _problem)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)


def _start_timer() -> None:
    g.started = time.perf_counter()
    metrics.HTTP_IN_PROGRESS.inc()


def _end_request(_exc: BaseException | None) -> None:
    if "started" in g:
        metrics.HTTP_IN_PROGRESS.dec()


def _observe(response: Response) -> Response:
    # Every label is bounded: anyone can send any method to any path.
    this_request, context = request._get_current_object(), g._get_current_object()  # one look-up each
    rule = this_request.url_rule
    route = rule.rule if rule else "unmatched"
    method = metrics.method_label(this_request.method)
    metrics.child(metrics.HTTP_REQUESTS, route, method, metrics.status_label(response.status_code)).inc()
    started = getattr(context, "started", None)
    if started is not None:
        metrics.child(metrics.HTTP_LATENCY, route, method).observe(time.perf_counter() - started)
    return response


def _problem(exc: Problem) -> Response:
    if request.url_rule and request.url_rule.endpoint == SUBMIT_ENDPOINT:
        metrics.child(metrics.JOBS_REJECTED, exc.reason).inc()
    return Response(exc.body(request.path), status=exc.status, mimetype=PROBLEM_JSON, headers=exc.headers)


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    detail = {
        413: f"request body larger than {current_app.config['MAX_CONTENT_LENGTH']} bytes",
        404: "no such resource",
    }.get(status, exc.description or exc.name)
    # Keep the exception's own headers (Allow on a 405), not its HTML content type.
    headers = {name: value for name, value in exc.get_headers() if name.lower() != "content-type"}
    return _problem(Problem(status, exc.name, detail, reason=f"http_{status}", headers=headers))


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error")
    return _problem(Problem(500, "Internal Server Error", "unexpected error", reason=RejectReason.INTERNAL))
