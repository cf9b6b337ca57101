"""Shared vocabulary: errors, the job, the JSON codec, schemas, request ids, logs.

Imports nothing else of modelpool."""
