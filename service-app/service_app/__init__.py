from service_app.config import ignore_multiprocess_metrics_dir

# Before anything imports prometheus_client.
ignore_multiprocess_metrics_dir()
