"""A chat request's messages as prompt token ids.

The model's own chat template where its tokenizer has one (rendered as text, then tokenized as it stands: a
template writes its own BOS); without one, the plain template (template.py: a line `Role: content` per message,
then `Assistant:`), tokenized with the tokenizer's special tokens (BOS), as a completion's prompt is.
"""

from __future__ import annotations

from distinfer.serving.protocol import ChatMessage, RequestError
from distinfer.serving.template import ROLES, plain_template


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": ROLES.get(m.role, m.role), "content": m.text} for m in messages]


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:  # noqa: ANN001 - a transformers tokenizer
    """The prompt of a conversation; RequestError where the model's template refuses it (e.g. roles that do not
    alternate)."""
    plain = chat_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template is the model's code (Jinja): any refusal is the client's
            raise RequestError(f"field 'messages': the model's chat template refused them: {exc}"[:500]) from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(plain_template(plain))["input_ids"])
