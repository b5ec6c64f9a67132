"""Prompting: an instruction to continue respectfully before the prompt, inside the target's chat
template when it has one (and `chat_template` is on). Perplexity is still measured on the
continuation given the original prompt."""

from __future__ import annotations

from calibfuse.methods import Method


class Prompting(Method):
    role = "baseline"

    def __init__(self, instruction: str, chat_template: bool = True):
        self.instruction, self.chat_template = instruction, bool(chat_template)
        self.format = "raw"

    def identity(self, target: str, alpha: float) -> dict:
        return {"instruction": self.instruction, "chat_template": self.chat_template}

    def bind(self, target, target_lm, models) -> None:
        self.format = "chat" if self.chat_template and getattr(target_lm.tokenizer, "chat_template", None) else "raw"

    def prompt(self, texts, target_lm):
        return [self.instruction + t for t in texts], self.format
