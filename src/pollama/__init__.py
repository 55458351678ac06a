"""pollama: a local LLM platform that speaks Ollama's protocols, on llama.cpp."""

__version__ = "0.1.0"

OLLAMA_API_VERSION = "0.33.0"
"""The Ollama release whose API and behaviour pollama matches: what ``/api/version`` reports
as ``version`` (clients gate features on it), and what the package's summary names
(pyproject.toml; tests/test_package.py keeps the three equal)."""
