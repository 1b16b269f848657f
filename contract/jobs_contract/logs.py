"""Logging set-up, the same for both apps."""

import logging


def configure_logging(app: str, level: str) -> None:
    """Log lines name the app and its process: `... INFO [main-app 123] main_app.broker: ...`."""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s [{app} %(process)d] %(name)s: %(message)s",
    )
    # pika logs every failed connect as an error; the apps log their own, single warning.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
