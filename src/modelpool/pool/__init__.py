"""The pool: workers that each own a model, the live operations on them, and the pool's metrics."""
