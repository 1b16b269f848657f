"""The project's dev tooling, installed from scripts/ (see scripts/pyproject.toml)."""
