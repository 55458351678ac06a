"""Prompt templates: a sandboxed Go ``text/template`` subset, Ollama's named templates, and
prompt rendering with Ollama's rules.

* ``Template.parse(text)`` / ``template.execute(data)``: the Go template engine (Modelfile
  ``TEMPLATE``); errors are ``pollama.errors.TemplateError`` with Go's messages.
* ``render_prompt(template, messages=..., tools=..., think=...)``: a chat or completion request
  rendered into prompt text exactly as Ollama's ``Template.Execute`` does.
* ``detect_named_template(chat_template)``: the built-in template Ollama picks for a GGUF's
  Jinja ``tokenizer.chat_template`` (Levenshtein distance < 100).
* ``template_capabilities`` / ``jinja_capabilities``: the ``tools``/``insert``/``thinking``
  capabilities a template grants; ``infer_thinking_tags`` / ``infer_tool_call_tag`` for the
  output parsers.
* ``RenderBudget`` / ``RenderLimitExceeded``: the bounds every render (Go or Jinja) runs
  under (steps, value and output sizes, nesting) and the ``TemplateError`` a template that
  exceeds one raises; ``MAX_RENDER_STEPS`` and ``MAX_RENDER_OUTPUT`` are the defaults.
"""

from ._budget import MAX_RENDER_OUTPUT, MAX_RENDER_STEPS, RenderBudget, RenderLimitExceeded
from ._capabilities import (
    go_template_has_tool_round_trip,
    infer_thinking_tags,
    infer_tool_call_tag,
    jinja_capabilities,
    jinja_has_tool_round_trip,
    prefer_jinja_template,
    template_capabilities,
)
from ._named import NamedTemplate, detect_named_template, named_template, named_templates
from ._prompt import collate, render_prompt, think_values
from ._template import Template

DEFAULT_TEMPLATE = "{{ .Prompt }}"
"""The template of a model that has none: the prompt passes through verbatim."""

__all__ = [
    "DEFAULT_TEMPLATE",
    "MAX_RENDER_OUTPUT",
    "MAX_RENDER_STEPS",
    "NamedTemplate",
    "RenderBudget",
    "RenderLimitExceeded",
    "Template",
    "collate",
    "detect_named_template",
    "go_template_has_tool_round_trip",
    "infer_thinking_tags",
    "infer_tool_call_tag",
    "jinja_capabilities",
    "jinja_has_tool_round_trip",
    "named_template",
    "named_templates",
    "prefer_jinja_template",
    "render_prompt",
    "template_capabilities",
    "think_values",
]
