"""The HTTP face: the app, admin routes, the API key, the listener, socket binding, the service."""
