#!/bin/sh
# A model that is not Python: plain POSIX shell. It echoes each request line back
# inside a result object; the pool must serve it like any other.
echo "loading (in shell)..."
echo "ready: Model-initialized"
while IFS= read -r line; do
    [ -z "$line" ] && continue
    echo "computing in shell"
    printf 'result: {"echo": %s, "shell": true}\n' "$line"
done
