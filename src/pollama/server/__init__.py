"""The HTTP server: the FastAPI app, its routes for every protocol, streaming, errors, limits."""
