"""The autoscaling signals tooling: promstack, hpa, scaling preview and demo (docs/observability.md)."""
