#!/usr/bin/env python3
"""A well-behaved model that answers every JSON value with {"echo": <that value>}.

The property tests send it arbitrary JSON. With ECHO_ID_FIELD set it also copies that
field from the request to the top of the result, as a model that supports
`--id-field` does.
"""

import json
import os
import sys

id_field = os.environ.get("ECHO_ID_FIELD")
print("ready: Model-initialized")
for line in sys.stdin:
    if not line.strip():
        continue
    request = json.loads(line)
    result = {"echo": request}
    if id_field and isinstance(request, dict) and id_field in request:
        result[id_field] = request.pop(id_field)
    print("result: " + json.dumps(result))
