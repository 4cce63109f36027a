"""What a client needs to know of the served model to prompt it, read once from its directory.

Clients render chats themselves (a gateway or client may run on another host, with ``common/``
only): the scheduler hands them the chat template and the special tokens it reads, and the
rendered text comes back as a prompt that is encoded without adding special tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pagedserve.common import protocol as p
from pagedserve.common.chat_template import ChatTemplate, read_chat_template, read_special_tokens
from pagedserve.scheduler_svc.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelCard:
    """The parts of ``ModelInfo`` that do not change while the scheduler runs."""

    model: str
    vocab_size: int
    chat_template: str | None
    special_tokens: dict[str, str]
    adds_bos_token: bool

    @classmethod
    def read(cls, model_dir: Path, tokenizer: Tokenizer, vocab_size: int,
             chat_template_file: str | None = None) -> ModelCard:
        """The card of ``model_dir``; ``chat_template_file`` replaces the model's template.
        The template is compiled here, so that a broken one stops the scheduler at start
        instead of failing every chat."""
        template = read_chat_template(model_dir, chat_template_file)
        special_tokens = read_special_tokens(model_dir)
        if template is not None:
            ChatTemplate(template, special_tokens)
        adds_bos = tokenizer.encode("a")[:1] != tokenizer.encode("a", False)[:1]
        return cls(Path(model_dir).name, vocab_size, template, special_tokens, adds_bos)

    def info(self, request_id: str, max_model_len: int, executor_ready: bool) -> p.ModelInfo:
        """The answer to a ``ModelInfoRequest``, with the service's state now."""
        return p.ModelInfo(request_id=request_id, model=self.model, max_model_len=max_model_len,
                           executor_ready=executor_ready, vocab_size=self.vocab_size,
                           chat_template=self.chat_template,
                           special_tokens=dict(self.special_tokens),
                           adds_bos_token=self.adds_bos_token)
