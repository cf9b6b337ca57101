"""The HTTP face: the app, the /predict fast path, admin routes, the API key, connection
accounting, the listener."""
