"""pollama: a local LLM platform that speaks Ollama's protocols, on llama.cpp."""

__version__ = "0.1.0"
