"""What the HTTP front end knows of the model: its name, tokenizer and limits. Tokenization and
chat templating happen here, on the front end's thread, never on the engine's."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.prompt_checks import check_fits, prompt_ids
from ..sampling_params import InvalidRequestError, SamplingParams
from .api_errors import bad_request

_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class ServedModel:
    name: str
    tokenizer: object
    vocab_size: int
    max_context: int

    @classmethod
    def of(cls, engine, name: str | None = None) -> "ServedModel":
        return cls(name or engine.model_name, engine.tokenizer, engine.config.vocab_size, engine.pool.max_context)

    def encode(self, prompt: str | None = None, token_ids: list[int] | None = None,
               messages: list | None = None) -> list[int]:
        """The prompt's token ids from exactly one of text, ids or chat messages; a 400 if bad."""
        if messages is not None:
            if prompt is not None or token_ids is not None:
                raise bad_request("give exactly one of prompt, prompt_token_ids or messages")
            return self._chat_ids(messages)
        try:
            return prompt_ids(self.tokenizer, self.vocab_size, prompt, token_ids)
        except InvalidRequestError as err:
            raise bad_request(str(err), param="prompt") from None

    def check_fits(self, ids: list[int], sampling: SamplingParams) -> None:
        try:
            check_fits(ids, sampling, self.max_context)
        except InvalidRequestError as err:
            raise bad_request(str(err), param="max_tokens") from None

    def room_after(self, ids: list[int]) -> int:
        """The longest answer that still fits the context (OpenAI chat's default max_tokens)."""
        return max(1, self.max_context - len(ids))

    def _chat_ids(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise bad_request("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
        plain = [_plain_message(m, i) for i, m in enumerate(messages)]
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(f"the model {self.name} has no chat template: use /v1/completions with a plain "
                              "prompt instead", "messages")
        try:
            text = self.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # the template itself may raise on role orders it does not support
            raise bad_request(f"the chat template rejected these messages: {err}", "messages") from None
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise bad_request("the messages produced an empty prompt", "messages")
        return ids


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
