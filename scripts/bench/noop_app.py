"""The no-op ceiling for `make bench`: the same Flask + gunicorn (gthread) setup as
main-app, with a POST /jobs that reads the body and answers 202 without any I/O.

Run with the production settings: gunicorn --config python:main_app.gunicorn_conf
--pythonpath scripts/bench noop_app:app
"""

from flask import Flask, Response, request

app = Flask(__name__)
_BODY = b'{"id":"00000000-0000-4000-8000-000000000000","type":"echo","status":"queued"}'


@app.post("/jobs")
def submit() -> Response:
    request.get_data(cache=False)
    return Response(_BODY, status=202, mimetype="application/json", headers={"Location": "/jobs/noop"})


@app.get("/healthz")
def healthz() -> Response:
    return Response(b'{"status":"ok"}', mimetype="application/json")
