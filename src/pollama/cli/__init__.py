"""The ``pollama`` command line: thin clients of the HTTP API, plus ``serve``."""
