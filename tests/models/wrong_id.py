#!/usr/bin/env python3
"""An id-echoing model (field "rid") that gets the id wrong as asked.

Per request {"answer_with": W}: "right" echoes the id, "none" leaves it out, "other"
makes one up, "previous" uses the previous request's id, "number" turns it into 7.
"""

import json
import sys

previous = None
print("ready: Model-initialized")
for line in sys.stdin:
    request = json.loads(line)
    rid = request.pop("rid")
    way = request.get("answer_with", "right")
    result = {"echo": request}
    if way == "right":
        result["rid"] = rid
    elif way == "other":
        result["rid"] = "made-up"
    elif way == "previous":
        result["rid"] = previous
    elif way == "number":
        result["rid"] = 7
    previous = rid
    print("result: " + json.dumps(result))
