"""Request validation against a JSON Schema, before any model sees the request.

A model that crashes on a request it does not understand costs a restart (seconds, or
far more for a model that loads terabytes). A schema that describes what the model
accepts turns such requests into a 400 that says what is wrong, at the cost of a
validation per request. The validator is `jsonschema`'s, for whichever draft the
schema's `$schema` names (the newest, 2020-12, if it names none).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError, best_match

__all__ = ["RequestSchema", "SchemaError", "load_schema"]

from modelpool.core.errors import BadRequest

MAX_COMPLAINT = 300  # characters of the validator's message a client is shown
MAX_VALUE = 60  # characters of the offending value quoted in it


class RequestSchema:
    """A compiled schema; `check(value)` raises BadRequest if the value does not match."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        # types-jsonschema's Validator protocol asks for a dict here; the classes it
        # stands for take any Mapping, as their own stubs say (validators.pyi).
        cls.check_schema(schema)  # type: ignore[arg-type]
        self._validator = cls(schema)

    def check(self, value: Any) -> None:
        try:
            error = best_match(self._validator.iter_errors(value))
        except RecursionError:
            raise BadRequest("request does not match the schema: nested too deeply") from None
        if error is None:
            return
        where = "".join(f"[{json.dumps(step)}]" for step in error.absolute_path)
        message = error.message
        instance = repr(error.instance)
        if len(instance) > MAX_VALUE:  # keep the complaint, not a copy of a huge value
            message = message.replace(instance, f"{instance[:MAX_VALUE]}...")
        if len(message) > MAX_COMPLAINT:
            message = f"{message[:MAX_COMPLAINT]}..."
        at = f" at {where}" if where else ""
        raise BadRequest(f"request does not match the schema{at}: {message}")


def load_schema(path: str | Path) -> dict[str, Any]:
    """Read and check a schema file; ValueError with a reason if it is no usable schema."""
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{path} is not a JSON Schema (an object)")  # noqa: TRY004
    try:
        RequestSchema(schema)
    except SchemaError as exc:
        raise ValueError(f"{path} is not a valid JSON Schema: {exc.message}") from None
    return schema
