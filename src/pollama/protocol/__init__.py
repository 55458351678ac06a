"""Wire models, one module per protocol. Raw dicts do not travel past the routes."""
