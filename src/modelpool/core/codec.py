"""The JSON side of the model protocol: what goes into a model and what is taken out.

Everything a client sends is parsed and checked here before it can reach a model, and
everything a model prints as a result is checked here before it can reach a client:

- NaN and the infinities are not JSON; they are refused both ways, so a result can
  always be written back as standard JSON.
- Nesting is bounded well below Python's recursion limit, so no JSON value can make
  the parser, the encoder, a schema validator or a Python model overflow its stack
  somewhere further down the line.
- A request goes to the model as one compact ASCII-only line, so nothing inside it
  (raw or escaped newlines, U+2028) can split it into two requests.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from modelpool.core.errors import BadRequest

MAX_REQUEST_DEPTH = 200
MAX_RESULT_DEPTH = 256  # a model may wrap a request in a few levels of its own
OUT_OF_RANGE = "a number is out of range (JSON has no infinity)"
CONTAINERS = (dict, list)


class ResultError(ValueError):
    """A result line that cannot be accepted; the model broke the protocol."""


class Answer(dict[str, Any]):
    """A model's result, as parsed, and the JSON line it came as (`raw`, or None): where
    that line is standard JSON as it stands, an HTTP answer sends it as it is, rather
    than writing again what was just read (for a vector of floats, the most costly of
    the service's own work for a request). A JSON reader reads the same values from
    either, but for numbers written with more digits than a double holds, which reach
    it as the model wrote them rather than rounded. Non-ASCII text goes out as the
    model's UTF-8, not as escapes. A library caller gets the dict."""

    __slots__ = ("raw",)

    def __init__(self, value: dict[str, Any], raw: bytes | None) -> None:
        super().__init__(value)
        self.raw = raw


def parse_request(body: bytes) -> Any:
    """The JSON value of a request body; raises BadRequest with a reason a person can act on."""
    if not body.strip():
        raise BadRequest('empty body: send one JSON value, e.g. {"data": 2}')
    try:
        value = _loads(body)
    except RecursionError:
        raise BadRequest(f"body is not accepted: nested deeper than {MAX_REQUEST_DEPTH}") from None
    except ValueError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    problem = _check(value, MAX_REQUEST_DEPTH)
    if problem:
        raise BadRequest(f"body is not accepted: {problem}")
    return value


def encode_request(value: Any, id_field: str | None = None, id_value: str | None = None) -> bytes:
    """One compact, ASCII-only JSON line for the model, with the request id added if asked.

    NaN and infinities are refused here too, for values that did not come through
    `parse_request` (the library API takes any Python value).
    """
    if id_field is not None:
        if not isinstance(value, dict):
            raise BadRequest(
                f"the request must be a JSON object: the service adds the field {id_field!r} to it"
            )
        if id_field in value:
            raise BadRequest(f"the request must not contain {id_field!r}: the service sets it")
        value = {**value, id_field: id_value}
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise BadRequest(f"request is not serialisable as JSON: {exc}") from None
    return text.encode("ascii") + b"\n"


def parse_result(
    payload: bytes, id_field: str | None = None, id_value: str | None = None
) -> Answer:
    """The JSON object a model printed after `result: `; ResultError if it is unusable.

    With an id field, the result must carry the id the request was sent with; the field
    is removed before the result goes back to the caller.
    """
    unique = True  # no object in it names a key twice (see Answer)
    try:
        try:
            value = _loads(payload, _RESULT_DECODER)
        except _DuplicateKey:
            unique, value = False, _loads(payload)
    except RecursionError:
        raise ResultError(f"JSON nested deeper than {MAX_RESULT_DEPTH}") from None
    except ValueError as exc:
        raise ResultError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ResultError(f"a JSON {_json_type(value)}, not an object")
    problem = _check(value, MAX_RESULT_DEPTH)
    if problem:
        raise ResultError(problem)
    if id_field is not None:
        if id_field not in value:
            raise ResultError(f"it does not carry the request id in {id_field!r}")
        got = value.pop(id_field)
        if got != id_value:
            raise ResultError(
                f"it carries the id {_short(got)} in {id_field!r}, not this request's {id_value}"
            )
        return Answer(value, None)  # the id field is taken out: written again
    # Sent as it came unless a byte in it is not standard JSON as it stands: a BOM, or a
    # control character (raw in a string, which the parser lets through; or whitespace,
    # which is harmless, but rare enough not to tell apart); or an object names a key
    # twice, which readers take differently (the first, the last, or an error).
    standard = unique and not payload.startswith(BOM) and _CONTROL.search(payload) is None
    return Answer(value, payload.strip() + b"\n" if standard else None)


def result_id(payload: bytes, id_field: str) -> Any:
    """The value of `id_field` in a result, or None if it is no JSON object that has one.

    For telling a stale result (one with an earlier request's id) from the rest; the
    result itself is still checked by `parse_result`.
    """
    try:
        value = _loads(payload)
    except (ValueError, RecursionError):
        return None
    return value.get(id_field) if isinstance(value, dict) else None


def _loads(data: bytes, decoder: json.JSONDecoder | None = None) -> Any:
    """Parse UTF-8 JSON (a leading BOM is allowed, as RFC 8259 permits).

    Decoding here, rather than handing bytes to json.loads, keeps it from guessing
    UTF-16 or UTF-32 from NUL bytes. Raw control characters inside strings are
    accepted (strict=False): they cannot survive into the model's line, which is
    re-encoded with escapes.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return (decoder or _DECODER).decode(text)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# Built once: json.loads and json.dumps with options build a decoder or an encoder per
# call, which cost more than parsing or writing a small request. (orjson was tried: it
# reads integers past 64 bits as floats, and writes NaN as null.)
_DECODER = json.JSONDecoder(strict=False, parse_constant=_reject_constant)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class _DuplicateKey(Exception):
    """An object names a key twice: the result is read again as before, the last one
    taken, and written again (see Answer)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise _DuplicateKey
    return value


_RESULT_DECODER = json.JSONDecoder(
    strict=False, parse_constant=_reject_constant, object_pairs_hook=_unique_keys
)
BOM = b"\xef\xbb\xbf"
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _check(value: Any, max_depth: int) -> str | None:
    """Why `value` cannot travel as standard JSON, or None if it can.

    Walks the containers with a stack of its own (recursion is what it guards against):
    nesting deeper than `max_depth`, or a float that is not finite (such as 1e400,
    which Python's parser reads as infinity without complaint). Each container's
    element types are gathered at C speed first, so a long flat array of numbers, the
    common large request, costs little.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return OUT_OF_RANGE
    if not isinstance(value, dict | list):
        return None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = list(item.values()) if isinstance(item, dict) else item
        kinds = set(map(type, children))
        if float in kinds and not _all_finite(children):
            return OUT_OF_RANGE
        if dict in kinds or list in kinds:
            if depth >= max_depth:
                return f"nested deeper than {max_depth}"
            stack.extend((child, depth + 1) for child in children if type(child) in CONTAINERS)
    return None


def _all_finite(items: list[Any]) -> bool:
    try:
        return all(map(math.isfinite, items))  # fast when every item is a number
    except (TypeError, OverflowError):  # strings, containers, or ints past float range
        return all(math.isfinite(item) for item in items if type(item) is float)


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else f"{text[:80]}..."
