"""Chat templates a recovered model can carry, so that every tool prompts it the way it was trained.

The Open-Instruct models were trained on ``<s><|user|>\\n{message}\\n<|assistant|>\\n{reply}</s>\\n``; their published
files carry no template, so without one transformers pipelines, vLLM and TGI prompt them wrongly. The template
writes the BOS token itself: ``apply_chat_template(..., tokenize=True)`` adds no special tokens, and a prompt
without its one BOS is not the training format (llama.cpp drops a leading BOS it would add anyway).
"""

from __future__ import annotations

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
    """Refuse, before anything is written, a template that Jinja cannot parse (every tool would fail on it later).

    jinja2 comes with torch; transformers renders templates with it, loop controls and its generation tag on."""
    import jinja2
    import jinja2.ext

    class Generation(jinja2.ext.Extension):
        """transformers' ``{% generation %}...{% endgeneration %}``, which marks the assistant's tokens."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols", Generation]).parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise UsageError(
            f"--chat-template {value}: not a valid Jinja template (line {exc.lineno}: {exc.message})"
        ) from None
