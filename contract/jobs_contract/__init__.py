"""The contract shared by main-app and service-app.

One definition of the job message, the job types and their payload schemas,
the job record in Redis and the RabbitMQ topology, so the two apps cannot
disagree about any of them.
"""

from jobs_contract.catalog import JOB_TYPES, Limits, ValidationFailed
from jobs_contract.message import SCHEMA_VERSION, DeadLetterReason, JobMessage, PoisonMessage
from jobs_contract.store import FINAL_STATUSES, STATUSES, JobStore

__all__ = [
    "FINAL_STATUSES",
    "JOB_TYPES",
    "SCHEMA_VERSION",
    "STATUSES",
    "JobMessage",
    "JobStore",
    "Limits",
    "DeadLetterReason",
    "PoisonMessage",
    "ValidationFailed",
]
