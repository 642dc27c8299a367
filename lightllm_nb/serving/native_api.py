"""The native API's shapes: `POST /api/generate` bodies in, SSE records and completions out."""

from __future__ import annotations

import dataclasses

from ..sampling_params import InvalidRequestError, SamplingParams
from .api_errors import bad_request
from .openai_api import GenerationRequest
from .request_fields import optional, reject_unknown
from .served_model import ServedModel

GENERATE_FIELDS = {"prompt", "prompt_token_ids", "messages", "sampling", "priority", "stream"}
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def parse_generate(body: dict, model: ServedModel) -> GenerationRequest:
    reject_unknown(body, GENERATE_FIELDS)
    fields = optional(body, "sampling", dict, default={})
    reject_unknown(fields, SAMPLING_FIELDS, "sampling")
    ids = model.encode(prompt=optional(body, "prompt", str), token_ids=optional(body, "prompt_token_ids", list),
                       messages=body.get("messages"))
    try:
        sampling = SamplingParams(**fields)
    except (InvalidRequestError, TypeError) as err:
        raise bad_request(f"sampling: {err}", param="sampling") from None
    model.check_fits(ids, sampling)
    return GenerationRequest(ids, sampling, optional(body, "stream", bool, default=True),
                             optional(body, "priority", int, default=0))


def output_record(out) -> dict:
    """One streamed RequestOutput; the last one carries the whole completion."""
    record = {"request_id": out.request_id, "text": out.text_delta, "token_ids": out.new_token_ids,
              "finished": out.finished, "finish_reason": out.finish_reason}
    if out.completion is not None:
        record["completion"] = completion_record(out.completion)
    return record


def completion_record(completion) -> dict:
    return dataclasses.asdict(completion)
