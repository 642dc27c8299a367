"""The native API's shapes: `POST /api/generate` bodies in, SSE records and completions out."""

from __future__ import annotations

import dataclasses

from ..sampling_params import SamplingParams
from .api_errors import ApiError, bad_request
from .request_fields import GenerationRequest, optional, reject_unknown
from .served_model import ServedModel

PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")
GENERATE_FIELDS = {*PROMPT_FIELDS, "sampling", "priority", "stream"}
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def parse_generate(body: dict, model: ServedModel) -> GenerationRequest:
    reject_unknown(body, GENERATE_FIELDS)
    fields = optional(body, "sampling", dict, default={})
    reject_unknown(fields, SAMPLING_FIELDS, "sampling")
    given = [name for name in PROMPT_FIELDS if body.get(name) is not None]
    if len(given) != 1:
        raise bad_request(f"pass exactly one of prompt, prompt_token_ids or messages (got {given or 'none'})",
                          param=given[1] if given else "prompt")
    try:
        ids = model.encode(prompt=optional(body, "prompt", str), token_ids=optional(body, "prompt_token_ids", list),
                           messages=body.get("messages"))
    except ApiError as err:
        err.param = given[0]  # the model's checks say "prompt" for text and ids alike
        raise
    return GenerationRequest(ids, dict(fields), optional(body, "stream", bool, default=True),
                             optional(body, "priority", int, default=0), prompt_field=given[0],
                             fields={name: f"sampling.{name}" for name in SAMPLING_FIELDS}, unnamed="sampling")


def output_record(out) -> dict:
    """One streamed RequestOutput; the last one carries the whole completion."""
    record = {"request_id": out.request_id, "text": out.text_delta, "token_ids": out.new_token_ids,
              "finished": out.finished, "finish_reason": out.finish_reason}
    if out.completion is not None:
        record["completion"] = completion_record(out.completion)
    return record


def completion_record(completion) -> dict:
    return dataclasses.asdict(completion)
