"""The HTTP side of influence-service: FastAPI app, CLI and typed client."""
