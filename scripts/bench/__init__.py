"""`make bench` and its helpers (docs/performance.md)."""
