"""OpenAI's /v1/completions and /v1/chat/completions: request bodies in, response bodies out.

Only the shapes live here (no HTTP): `parse_completion` / `parse_chat` turn a JSON body into a
`GenerationRequest`, and `OpenAIShapes` renders outputs as OpenAI's objects and chunks. OpenAI's
fields that change nothing generated here are accepted and ignored; those asking for what this
server does not do are accepted only with a value that asks for none of it; other names are typos.
"""

from __future__ import annotations

import time

from .api_errors import ApiError, bad_request
from .request_fields import GenerationRequest, int_list, optional, reject_unknown, shown, string_list
from .served_model import ServedModel

_SAMPLING = {"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
             # vLLM's extras beyond OpenAI's list
             "top_k", "repetition_penalty", "ignore_eos", "stop_token_ids"}
# vLLM's structured-output fields (beside OpenAI's response_format): the SamplingParams field each
# sets, and the JSON types it takes.
GUIDED = {"guided_json": ("json_schema", (dict, str)), "guided_regex": ("regex", str),
          "guided_choice": ("choice", list), "guided_grammar": ("grammar", str)}


def _never(value) -> bool:
    return False


def _is_one(value) -> bool:
    return type(value) is int and value == 1


# OpenAI's fields for what this server does not do: accepted only with a value that asks for none
# of it (null always is), else a 400 that says why.
_COMMON_LIMITED = {
    "n": (_is_one, "this server returns one choice per request (n=1); send several requests instead"),
    "logit_bias": (lambda v: v == {}, "leave logit_bias out"),
}
_COMPLETION_LIMITED = {**_COMMON_LIMITED, "echo": (lambda v: v is False, "leave it out"),
                       "best_of": (_is_one, "leave it out"), "suffix": (_never, "leave it out")}
_CHAT_LIMITED = {
    **_COMMON_LIMITED,
    "tools": (lambda v: v == [], "tool calling is not supported: leave tools out"),
    "functions": (lambda v: v == [], "function calling is not supported: leave functions out"),
    "tool_choice": (lambda v: v in ("none", "auto"), "tool calling is not supported: leave tool_choice out"),
    "function_call": (lambda v: v in ("none", "auto"), "function calling is not supported: leave it out"),
    "modalities": (lambda v: v == ["text"], 'only text is generated here: give ["text"] or leave it out'),
    "audio": (_never, "audio output is not supported: leave audio out"),
    "web_search_options": (_never, "web search is not supported: leave web_search_options out"),
    "moderation": (_never, "no moderation runs here: leave moderation out"),
    "verbosity": (lambda v: v == "medium", "the answer's length is set by max_tokens here: leave verbosity out"),
}
# OpenAI's chat fields that change nothing generated here, checked for their JSON type and ignored:
# nothing is stored, there is one service tier, the prefix cache needs no key, no reasoning budget
# is set here, tools are off, and a prediction only speeds up an answer that is the same without it.
_CHAT_IGNORED = {"store": bool, "metadata": dict, "safety_identifier": str, "service_tier": str,
                 "prompt_cache_key": str, "prompt_cache_retention": str, "prompt_cache_options": dict,
                 "reasoning_effort": str, "parallel_tool_calls": bool, "prediction": dict}
_COMMON = _SAMPLING | set(GUIDED) | {"model", "max_tokens", "stop", "stream", "stream_options", "user", "priority",
                                     "response_format"}
COMPLETION_FIELDS = _COMMON | set(_COMPLETION_LIMITED) | {"prompt", "logprobs"}
CHAT_FIELDS = (_COMMON | set(_CHAT_LIMITED) | set(_CHAT_IGNORED)
               | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"})


def parse_completion(body: dict, model: ServedModel) -> GenerationRequest:
    reject_unknown(body, COMPLETION_FIELDS)
    _check_common(body, model, _COMPLETION_LIMITED)
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
    return _request(body, ids, "prompt", {"max_tokens": max_tokens, "logprobs": logprobs}, {})


def parse_chat(body: dict, model: ServedModel) -> GenerationRequest:
    reject_unknown(body, CHAT_FIELDS)
    _check_common(body, model, _CHAT_LIMITED)
    for name, kind in _CHAT_IGNORED.items():
        optional(body, name, kind)
    ids = model.encode(messages=body.get("messages"))
    want = optional(body, "logprobs", bool, default=False)
    top = optional(body, "top_logprobs", int)
    if top is not None and (not want or not 0 <= top <= 20):
        raise bad_request("top_logprobs needs logprobs=true and must be in [0, 20]", param="top_logprobs")
    given = optional(body, "max_completion_tokens", int), optional(body, "max_tokens", int)
    max_field = "max_completion_tokens" if given[0] is not None else "max_tokens"
    max_tokens = given[0] if given[0] is not None else given[1]
    if max_tokens is None:
        max_tokens = model.room_after(ids)
    return _request(body, ids, "messages", {"max_tokens": max_tokens, "logprobs": (top or 0) if want else None},
                    {"max_tokens": max_field, "logprobs": "top_logprobs" if top is not None else "logprobs"})


def _constraint(body: dict) -> tuple[dict, dict]:
    """The structured-output constraint asked for, at most one (response_format counts): as
    SamplingParams fields, and which body field set it."""
    given = []  # (body field, SamplingParams field, value)
    fmt = optional(body, "response_format", dict)
    if fmt is not None and (asked := _response_format(fmt)) is not None:
        given.append(("response_format", "json_schema", asked))
    for name, (field, types) in GUIDED.items():
        value = optional(body, name, types)
        if value is not None:
            given.append((name, field, value))
    if len(given) > 1:
        names = [name for name, _, _ in given]
        raise bad_request(f"{' and '.join(names)} were given together: a request takes at most one structured-"
                          f"output constraint (response_format other than text, {', '.join(GUIDED)})",
                          param=names[1])
    return ({given[0][1]: given[0][2]}, {given[0][1]: given[0][0]}) if given else ({}, {})


def _response_format(fmt: dict):
    """OpenAI's response_format as a json_schema value (True: any JSON object), None for text."""
    spec = fmt.get("json_schema")
    if fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return True
    if fmt.get("type") == "json_schema" and isinstance(spec, dict):
        if "schema" not in spec:
            return True
        if isinstance(spec["schema"], dict):
            return spec["schema"]
        raise bad_request(f"response_format.json_schema.schema={shown(spec['schema'])} is invalid: give a JSON "
                          "schema object, or leave schema out for any JSON object", param="response_format")
    raise bad_request(f"response_format={shown(fmt)} is not supported: give {{\"type\": \"text\"}}, "
                      "{\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": "
                      "{\"name\": ..., \"schema\": {...}}}", param="response_format")


def _check_common(body: dict, model: ServedModel, limited: dict) -> None:
    name = optional(body, "model", str)
    if name is not None and name != model.name:
        raise ApiError(404, f"the model {name!r} does not exist here: this server serves {model.name!r}",
                       param="model", code="model_not_found")
    for field, (harmless, why) in limited.items():
        value = body.get(field)
        if value is not None and not harmless(value):
            raise bad_request(f"{field}={shown(value)} is not supported: {why}", param=field)
    optional(body, "user", str)
    optional(body, "stream", bool)
    options = optional(body, "stream_options", dict, default={})
    reject_unknown(options, {"include_usage", "continuous_usage_stats", "include_obfuscation"}, "stream_options")


def _request(body: dict, ids: list[int], prompt_field: str, sampling: dict, fields: dict) -> GenerationRequest:
    sampling.update({k: body[k] for k in _SAMPLING if body.get(k) is not None})
    sampling["stop"] = tuple(string_list(body, "stop") or ())
    if "stop_token_ids" in sampling:
        sampling["stop_token_ids"] = tuple(int_list(sampling["stop_token_ids"], "stop_token_ids"))
    constraint, constraint_fields = _constraint(body)
    priority = optional(body, "priority", int, default=0)
    usage = bool(optional(body, "stream_options", dict, default={}).get("include_usage"))
    return GenerationRequest(ids, {**sampling, **constraint}, bool(body.get("stream")), priority, usage, prompt_field,
                             {**fields, **constraint_fields})


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
