"""OpenAI's /v1/completions and /v1/chat/completions: request bodies in, response bodies out.

Only the shapes live here (no HTTP): `parse_completion` / `parse_chat` turn a JSON body into a
`GenerationRequest`, and `OpenAIShapes` renders outputs as OpenAI's objects and chunks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..sampling_params import InvalidRequestError, SamplingParams
from .api_errors import ApiError, bad_request
from .request_fields import int_list, optional, reject_unknown, string_list
from .served_model import ServedModel

_SAMPLING_FIELDS = {"max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
                    # vLLM's extras beyond OpenAI's list
                    "top_k", "repetition_penalty", "ignore_eos", "stop_token_ids"}
_COMMON = _SAMPLING_FIELDS | {"model", "n", "stream", "stream_options", "user", "logit_bias", "priority"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format",
                         "tools", "tool_choice", "parallel_tool_calls"}


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams
    stream: bool
    priority: int = 0
    include_usage: bool = False   # streaming: a last chunk with usage (stream_options.include_usage)


def parse_completion(body: dict, model: ServedModel) -> GenerationRequest:
    reject_unknown(body, COMPLETION_FIELDS)
    _check_common(body, model)
    for name, allowed in (("echo", False), ("best_of", 1), ("suffix", None)):
        if body.get(name) not in (None, allowed):
            raise bad_request(f"{name}={body[name]!r} is not supported: leave it out", param=name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = model.encode(prompt=prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request(f"got {len(prompt)} prompts: this server takes one prompt per request; send them as "
                          "separate requests", param="prompt")
    elif isinstance(prompt, list):
        ids = model.encode(token_ids=int_list(prompt, "prompt"))
    else:
        raise bad_request("prompt is required: a string or a list of token ids", param="prompt")
    logprobs = optional(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise bad_request(f"logprobs={logprobs} is invalid: it must be in [0, 20]", param="logprobs")
    max_tokens = optional(body, "max_tokens", int, default=16)
    return _request(body, model, ids, max_tokens, logprobs)


def parse_chat(body: dict, model: ServedModel) -> GenerationRequest:
    reject_unknown(body, CHAT_FIELDS)
    _check_common(body, model)
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise bad_request("tool calling is not supported: leave tools and tool_choice out", param="tools")
    constraint = _response_format(optional(body, "response_format", dict, default={"type": "text"}))
    ids = model.encode(messages=body.get("messages"))
    want = optional(body, "logprobs", bool, default=False)
    top = optional(body, "top_logprobs", int)
    if top is not None and (not want or not 0 <= top <= 20):
        raise bad_request("top_logprobs needs logprobs=true and must be in [0, 20]", param="top_logprobs")
    max_tokens = optional(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = optional(body, "max_tokens", int)
    if max_tokens is None:
        max_tokens = model.room_after(ids)
    return _request(body, model, ids, max_tokens, (top or 0) if want else None, constraint)


def _response_format(fmt: dict) -> dict:
    """OpenAI's response_format as SamplingParams fields (structured output)."""
    if fmt.get("type") == "json_object":
        return {"json_schema": True}
    if fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        return {"json_schema": fmt["json_schema"].get("schema", True)}
    if fmt.get("type") != "text":
        raise bad_request(f"response_format={fmt!r} is not supported: give {{\"type\": \"text\"}}, "
                          "{\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": "
                          "{\"name\": ..., \"schema\": {...}}}", param="response_format")
    return {}


def _check_common(body: dict, model: ServedModel) -> None:
    name = optional(body, "model", str)
    if name is not None and name != model.name:
        raise ApiError(404, f"the model {name!r} does not exist here: this server serves {model.name!r}",
                       param="model", code="model_not_found")
    if optional(body, "n", int, default=1) != 1:
        raise bad_request(f"n={body['n']} is not supported: this server returns one choice per request (n=1); "
                          "send several requests instead", param="n")
    if optional(body, "logit_bias", dict):
        raise bad_request("logit_bias is not supported: leave it out", param="logit_bias")
    optional(body, "user", str)
    optional(body, "stream", bool)
    options = optional(body, "stream_options", dict, default={})
    reject_unknown(options, {"include_usage", "continuous_usage_stats"}, "stream_options")


def _request(body: dict, model: ServedModel, ids: list[int], max_tokens: int, logprobs: int | None,
             constraint: dict | None = None) -> GenerationRequest:
    fields = {k: body[k] for k in _SAMPLING_FIELDS - {"stop", "max_tokens"} if body.get(k) is not None}
    fields.update(constraint or {})
    stop = string_list(body, "stop")
    if "stop_token_ids" in fields:
        fields["stop_token_ids"] = tuple(int_list(fields["stop_token_ids"], "stop_token_ids"))
    try:
        sampling = SamplingParams(max_tokens=max_tokens, stop=tuple(stop or ()), logprobs=logprobs, **fields)
    except InvalidRequestError as err:
        raise bad_request(str(err)) from None
    model.check_fits(ids, sampling)
    priority = optional(body, "priority", int, default=0)
    usage = bool(optional(body, "stream_options", dict, default={}).get("include_usage"))
    return GenerationRequest(ids, sampling, bool(body.get("stream")), priority, usage)


class OpenAIShapes:
    """Response objects for one request: `chat=True` renders chat.completion(.chunk) objects."""

    def __init__(self, model: ServedModel, request_id: str, *, chat: bool):
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def response(self, completion) -> dict:
        choice = {"index": 0, "finish_reason": completion.finish_reason,
                  "logprobs": self.logprobs(completion.logprobs) if completion.logprobs else None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": completion.text}
        else:
            choice["text"] = completion.text
        return {**self._envelope(self.object, [choice], usage=usage(completion)), "lightllm": extension(completion)}

    def chunk(self, text: str, finish_reason: str | None, logprobs: list | None = None, *,
              first: bool = False) -> dict:
        choice = {"index": 0, "finish_reason": finish_reason,
                  "logprobs": self.logprobs(logprobs) if logprobs else None}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = text
        return self._envelope(self.object + ".chunk" if self.chat else self.object, [choice])

    def usage_chunk(self, completion) -> dict:
        return {**self._envelope(self.object + ".chunk" if self.chat else self.object, [], usage=usage(completion)),
                "lightllm": extension(completion)}

    def logprobs(self, entries: list) -> dict:
        """The engine's [{"token_id", "logprob", "top": [(id, logprob)]}] as OpenAI's logprobs object."""
        decode = self.model.decode
        if self.chat:
            def item(token_id, logprob):
                text = decode([token_id])
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            return {"content": [{**item(e["token_id"], e["logprob"]),
                                 "top_logprobs": [item(t, lp) for t, lp in (e.get("top") or [])]} for e in entries]}
        tokens = [decode([e["token_id"]]) for e in entries]
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{decode([t]): lp for t, lp in (e.get("top") or [])} for e in entries],
                "text_offset": offsets}

    def _envelope(self, kind: str, choices: list, usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model.name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


def extension(completion) -> dict:
    """Our field on responses (OpenAI clients keep unknown fields, e.g. `response.model_extra`):
    where the request's time went (see scheduling/timeline.py and telemetry/explain.py)."""
    return {"metrics": completion.metrics, "timeline": completion.timeline}


def usage(completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def models_list(model: ServedModel, created: int) -> dict:
    return {"object": "list", "data": [{"id": model.name, "object": "model", "created": created,
                                        "owned_by": "lightllm-nb", "max_model_len": model.max_context}]}
