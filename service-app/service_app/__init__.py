import os

# service-app is one process with a plain metrics registry. An inherited
# PROMETHEUS_MULTIPROC_DIR (meant for main-app's gunicorn, e.g. from a shared
# ConfigMap or env file) would switch prometheus_client to multiprocess files in a
# directory main-app wipes at start: drop it before prometheus_client is imported.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
