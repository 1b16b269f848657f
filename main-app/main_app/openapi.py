"""The OpenAPI 3.1 document of main-app, built from the same schemas the API validates with."""

from typing import Any

from jobs_contract import STATUSES
from jobs_contract.catalog import request_schema

JSON = "application/json"
PROBLEM = "application/problem+json"


def openapi_document(settings) -> dict[str, Any]:
    def problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
        response: dict[str, Any] = {
            "description": description,
            "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if headers:
            response["headers"] = headers
        return response

    retry_after = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}}
    unauthorized = problem("Missing or invalid bearer token")
    unavailable = problem("RabbitMQ or Redis is unavailable; this request was not accepted", retry_after)
    store_unavailable = problem("Redis (the job store) is unavailable", retry_after)
    accepted = {
        "description": "Accepted: recorded in the job store and confirmed by the broker",
        "headers": {
            "Location": {"description": "URL of the job", "schema": {"type": "string"}},
            "Idempotent-Replayed": {
                "description": "`true` when this answers a repeated Idempotency-Key with the job of the first "
                               "request; the body then has that job's current status",
                "schema": {"type": "string", "enum": ["true"]},
            },
        },
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/JobAccepted"}}},
    }
    submit = {
        "summary": "Submit a job",
        "security": [{"bearer": []}],
        "parameters": [{
            "name": "Idempotency-Key", "in": "header", "required": False,
            "description": "Same key and body: the same job is returned, also when the first request failed "
                           "after (or with) an ambiguous publish. Same key, other body: 422.",
            "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
        }],
        "requestBody": {"required": True, "content": {JSON: {"schema": {"$ref": "#/components/schemas/JobRequest"}}}},
        "responses": {
            "202": accepted,
            "400": problem("Malformed JSON or header"),
            "401": unauthorized,
            "409": problem("A request with this Idempotency-Key is still in progress (with Retry-After), or the "
                           "job of this Idempotency-Key has expired from the job store (no Retry-After)",
                           retry_after),
            "413": problem(f"Body larger than {settings.max_body_bytes} bytes"),
            "415": problem("Content type is not JSON"),
            "422": problem("The job does not match its schema, or is nested deeper than 254 levels; "
                           "`errors[].pointer` names the field"),
            "503": unavailable,
        },
    }
    health = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
    readiness = {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ready", "not ready"]},
            "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
        },
        "required": ["status", "checks"],
    }
    timestamp = {"type": "string", "format": "date-time"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "main-app job API",
            "version": "1.0.0",
            "description": "Submit jobs for asynchronous processing and follow their status.",
        },
        "paths": {
            "/jobs": {"post": {**submit, "operationId": "submitJob"}},
            "/user-request-job": {"post": {**submit, "operationId": "submitJobLegacy",
                                           "summary": "Submit a job (alias of POST /jobs)"}},
            "/jobs/{id}": {"get": {
                "operationId": "getJob",
                "summary": "Status and result of a job",
                "security": [{"bearer": []}],
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "The job",
                            "content": {JSON: {"schema": {"$ref": "#/components/schemas/Job"}}}},
                    "401": unauthorized,
                    "404": problem("No such job for this client"),
                    "503": store_unavailable,
                },
            }},
            "/healthz": {"get": {
                "operationId": "healthz", "summary": "The process is alive", "security": [],
                "responses": {"200": {"description": "Alive", "content": {JSON: {"schema": health}}}},
            }},
            "/readyz": {"get": {
                "operationId": "readyz", "security": [],
                "summary": "RabbitMQ and Redis are reachable, and jobs handed to the publisher are published",
                "responses": {
                    "200": {"description": "Ready", "content": {JSON: {"schema": readiness}}},
                    "503": {"description": "Not ready", "content": {JSON: {"schema": readiness}}},
                },
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document", "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1 document",
                                      "content": {JSON: {"schema": {"type": "object"}}}}},
            }},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "JobRequest": request_schema(settings.limits),
                "JobAccepted": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "type": {"type": "string"},
                        "status": {"type": "string", "enum": list(STATUSES)},
                        "created_at": timestamp,
                    },
                    "required": ["id", "type", "status", "created_at"],
                },
                "Job": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "type": {"type": "string"},
                        "status": {"type": "string", "enum": list(STATUSES)},
                        "attempts": {"type": "integer", "minimum": 0},
                        "result": {"description": "The job's result once succeeded (any JSON value)"},
                        "error": {"type": ["string", "null"]},
                        "created_at": timestamp,
                        "started_at": {"type": ["string", "null"], "format": "date-time"},
                        "finished_at": {"type": ["string", "null"], "format": "date-time"},
                    },
                    "required": ["id", "type", "status", "attempts", "result", "error", "created_at",
                                 "started_at", "finished_at"],
                },
                "Problem": {
                    "type": "object",
                    "description": "RFC 9457 problem details",
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                        "errors": {"type": "array", "items": {
                            "type": "object",
                            "properties": {"pointer": {"type": "string"}, "detail": {"type": "string"}},
                            "required": ["pointer", "detail"],
                        }},
                    },
                    "required": ["type", "title", "status", "detail"],
                },
            },
        },
    }
