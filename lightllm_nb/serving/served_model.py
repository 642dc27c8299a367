"""What the HTTP front end knows of the model: its name, tokenizer and limits. Tokenization and
chat templating happen here, on the front end's thread, never on the engine's."""

from __future__ import annotations

import copy

from ..engine.prompt_checks import check_fits
from ..sampling_params import InvalidRequestError, SamplingParams
from .api_errors import bad_request

_ROLES = ("system", "user", "assistant", "tool", "developer")


class ServedModel:
    """The engine's `PromptEncoder` (its own tokenizer copy: a fast tokenizer must never be used by
    the step thread and this one at once) with HTTP's answers: a bad prompt is a 400."""

    def __init__(self, prompts, decoder, name: str):
        self.prompts = prompts
        self.name = name
        self.max_context = prompts.max_context
        self._decoder = decoder  # a tokenizer used on the IOLoop thread only (logprob token texts)

    @classmethod
    def of(cls, engine, name: str | None = None) -> "ServedModel":
        return cls(engine.prompts, copy.deepcopy(engine.tokenizer), name or engine.model_name)

    def encode(self, prompt: str | None = None, token_ids: list[int] | None = None,
               messages: list | None = None) -> list[int]:
        """The prompt's token ids from exactly one of text, ids or chat messages; a 400 if bad."""
        if messages is not None and (prompt is not None or token_ids is not None):
            raise bad_request("give exactly one of prompt, prompt_token_ids or messages")
        try:
            if messages is None:
                return self.prompts.encode(prompt, token_ids)
            if not isinstance(messages, list) or not messages:
                raise bad_request("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
            plain = [_plain_message(m, i) for i, m in enumerate(messages)]
            try:
                return self.prompts.chat_ids(plain)
            except InvalidRequestError:
                raise
            except Exception as err:  # the template itself may refuse some role orders
                raise bad_request(f"the chat template rejected these messages: {err}", "messages") from None
        except InvalidRequestError as err:
            raise bad_request(str(err), param="messages" if messages is not None else "prompt") from None

    def check_fits(self, ids: list[int], sampling: SamplingParams) -> None:
        try:
            check_fits(ids, sampling, self.max_context)
        except InvalidRequestError as err:
            raise bad_request(str(err), param="max_tokens") from None

    def room_after(self, ids: list[int]) -> int:
        """The longest answer that still fits the context (OpenAI chat's default max_tokens)."""
        return max(1, self.max_context - len(ids))

    def decode(self, token_ids: list[int]) -> str:
        return self._decoder.decode(token_ids)


def _plain_message(message, index: int) -> dict:
    """{"role", "content"} with content a string (OpenAI also allows a list of text parts)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object with role and content", "messages")
    unknown = set(message) - {"role", "content", "name"}
    if unknown:
        raise bad_request(f"{where} has unsupported field(s) {sorted(unknown)}: give role and content", "messages")
    role, content = message.get("role"), message.get("content")
    if role not in _ROLES:
        raise bad_request(f"{where}.role={role!r} is invalid: use one of {list(_ROLES)}", "messages")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise bad_request(f"{where}.content parts must be {{\"type\": \"text\", \"text\": ...}} "
                              "(only text is supported)", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad_request(f"{where}.content must be a string or a list of text parts", "messages")
    return {"role": role, "content": content}
