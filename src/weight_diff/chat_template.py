"""Chat templates a recovered model can carry, so that every tool prompts it the way it was trained.

The Open-Instruct models were trained on ``<s><|user|>\\n{message}\\n<|assistant|>\\n{reply}</s>\\n``; their published
files carry no template, so without one transformers pipelines, vLLM and TGI prompt them wrongly. The template
writes the BOS token itself: ``apply_chat_template(..., tokenize=True)`` adds no special tokens, and a prompt
without its one BOS is not the training format (llama.cpp drops a leading BOS it would add anyway).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError
from .untrusted import SMALL_FILE_LIMIT, read_small

# Built with Jinja whitespace control so that the rendered text is exactly open-instruct's training text
# (``_concat_messages(messages).strip()`` in its finetune.py): each message's content stripped, a newline after each
# turn but the last (the whole text was stripped), and the card's ``<|assistant|>\\n`` for a generation prompt.
OPEN_INSTRUCT = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '<|system|>\\n' + (message['content'] | trim) }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|user|>\\n' + (message['content'] | trim) }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>\\n' + (message['content'] | trim) + eos_token }}"
    "{%- else -%}{{ raise_exception('open-instruct template: unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- if not loop.last or add_generation_prompt -%}{{ '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

BUILT_IN = {"open-instruct": OPEN_INSTRUCT}


def resolve_template(value: str) -> str:
    """Return the Jinja text of a built-in template name, or of a template file the user wrote."""
    if value in BUILT_IN:
        return BUILT_IN[value]
    path = Path(value)
    if not path.is_file():
        raise UsageError(
            f"--chat-template {value}: neither a built-in template ({', '.join(BUILT_IN)}) nor a readable file"
        )
    try:
        text = read_small(path, limit=SMALL_FILE_LIMIT, what="chat template", error=UsageError).decode()
    except UnicodeDecodeError:
        raise UsageError(f"--chat-template {value}: not UTF-8 text, so not a Jinja chat template") from None
    if "{" not in text:
        raise UsageError(f"--chat-template {value}: does not look like a Jinja chat template")
    _check_syntax(value, text)
    return text


def _check_syntax(value: str, text: str) -> None:
    """Refuse, before anything is written, a template that will not compile where it is used: with transformers'
    own compiler (its filters, globals and ``{% generation %}`` tag) where it has one, else with Jinja's (jinja2
    comes with torch) and loop controls. Parsing alone let through an unknown filter or a ``break`` outside a loop.
    """
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # a transformers without it: Jinja's own compiler, with what transformers adds to it
        compile_template = _jinja_compile
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):  # a tokenizer_config.json, say: as a template it would render as itself
        raise UsageError(f"--chat-template {value}: a JSON file, not a template; give the template's own text")
    try:
        compile_template(text)
    except (jinja2.TemplateError, SyntaxError) as exc:
        where = f"line {exc.lineno}: " if getattr(exc, "lineno", None) else ""
        raise UsageError(f"--chat-template {value}: not a valid Jinja template ({where}{exc})") from None


def _jinja_compile(text: str) -> None:
    import jinja2
    import jinja2.ext

    class Generation(jinja2.ext.Extension):
        """transformers' ``{% generation %}...{% endgeneration %}``, which marks the assistant's tokens."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    jinja2.Environment(extensions=["jinja2.ext.loopcontrols", Generation]).from_string(text)
