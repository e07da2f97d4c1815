"""`chat_template:` resolved to the Jinja text written into the output tokenizer: a named template
(MergeKit 0.1.5's names; these texts render every conversation as MergeKit's do under
transformers' chat renderer, tests/golden/tokenizer checks), `auto` (the most common template
among the inputs' tokenizers), or the Jinja text given."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = ["TEMPLATES", "resolve_chat_template"]

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_LLAMA3 = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
    " + '<|eot_id|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# one block per role; turns are separated by a blank line pair, the system text comes first
_ALPACA = (
    "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{{ (system | last).content | trim if system else '' }}{{ '\\n\\n' }}"
    "{% set heads = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} %}"
    "{% for message in messages %}"
    "{% if message['role'] in heads %}"
    "{{ heads[message['role']] + '\\n' + (message['content'] | trim) }}"
    "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"
)

_MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message is defined %}"
    "{{ ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}"
    "{% endif %}"
    "{% endfor %}"
)

#: Template name -> Jinja text (the names of `settings.NAMED_TEMPLATES`).
TEMPLATES = {"alpaca": _ALPACA, "chatml": _CHATML, "llama3": _LLAMA3, "mistral": _MISTRAL}


def resolve_chat_template(value: str | None, locations: Sequence[str],
                          storage_options: dict[str, Any] | None) -> str | None:
    """The template text for `chat_template: value` (None: leave the tokenizer's own).

    `auto` takes the template most of `locations`' tokenizers carry (a tie: the first in config
    order, base first), and nothing when none carries one, as MergeKit does."""
    if value is None:
        return None
    if value in TEMPLATES:
        return TEMPLATES[value]
    if value != "auto":
        return value
    from moemerge.io.vocab.build import load_tokenizer

    found: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for loc in locations:
            tok = load_tokenizer(loc, storage_options, tmp)
            template = getattr(tok, "chat_template", None) if tok is not None else None
            if isinstance(template, dict):
                template = template.get("default")
            if isinstance(template, str) and template:
                found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None
