"""The plain chat template: a line `Role: content` per message, then the answer's cue `Assistant:`.

distinfer's server renders a conversation with it where the model's tokenizer has no chat template of its own,
and the load generator with it where multi-turn sessions go to the completions API. Pure: no torch.
"""

from __future__ import annotations

ROLES = {"developer": "system"}  # the OpenAI API's newer name for system messages


def plain_template(messages: list[dict[str, str]]) -> str:
    """    System: You are terse.
    User: What is a KV cache?
    Assistant:"""
    return "".join(f"{ROLES.get(m['role'], m['role']).capitalize()}: {m['content']}\n" for m in messages) + \
        "Assistant:"
