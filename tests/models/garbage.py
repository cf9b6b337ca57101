#!/usr/bin/env python3
"""Answers each request with the broken result it names.

Request {"kind": K}; K is one of the keys of GARBAGE below. Each is a model failure
(502): none may reach the client, crash the service, or answer another request.
"""

import json
import os
import sys

GARBAGE = {
    "not_json": b"result: {ice_found: yes}\n",
    "array": b"result: [1, 2, 3]\n",
    "string": b'result: "fine"\n',
    "null": b"result: null\n",
    "empty": b"result: \n",
    "nan": b'result: {"x": NaN}\n',
    "infinity": b'result: {"x": 1e999}\n',
    "deep": b"result: " + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"\n",
    "huge_int": b'result: {"x": ' + b"9" * 5000 + b"}\n",
    "bad_utf8": b'result: {"x": "\xff\xfe"}\n',
    "nul": b'result: {"x": 1}\x00\n',
    "two_objects": b'result: {"a": 1} {"b": 2}\n',
}

print("ready: Model-initialized")
for line in sys.stdin:
    os.write(1, GARBAGE[json.loads(line)["kind"]])
