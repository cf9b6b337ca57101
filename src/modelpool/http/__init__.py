"""The HTTP face: the app, admin routes, the API key, connection accounting, the listener,
socket binding, the service."""
