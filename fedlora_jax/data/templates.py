"""Prompt templates: the standard Alpaca text (default) or the tokenizer's own chat template."""

from __future__ import annotations

from typing import Any

from fedlora_jax.data.rows import DataError

TEMPLATES = ("alpaca", "chat")

ALPACA_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
ALPACA_NO_CONTEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def check_template(template: str, tokenizer: Any) -> None:
    """Fail early, in one line, for an unknown template or a tokenizer without a chat template."""
    if template not in TEMPLATES:
        raise DataError(f"data.template={template!r}: allowed values are {', '.join(TEMPLATES)}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template='chat': this tokenizer has no chat template; use 'alpaca'")


def render_prompt(instruction: str, context: str, template: str, tokenizer: Any) -> str:
    """The prompt text up to where the response starts (no BOS: tokenisation adds it).

    The chat variant puts instruction and context in one user turn (context after a blank line)
    and asks for the assistant turn; a leading BOS string the template writes is removed so BOS
    is added exactly once.
    """
    if template == "alpaca":
        fmt = ALPACA_WITH_CONTEXT if context else ALPACA_NO_CONTEXT
        return fmt.format(instruction=instruction, context=context)
    content = f"{instruction}\n\n{context}" if context else instruction
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos) :] if bos and text.startswith(bos) else text
