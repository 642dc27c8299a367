"""What every event-stream reader computes per step, written for speed (no dataclasses.asdict or
replace per row), checked against the plain dataclass forms on fresh random events."""

import dataclasses
import json
import random

import numpy as np

from lightllm_nb.scheduling.decisions import Decision
from lightllm_nb.telemetry.events import BatchRow, KVHolder, StepEvent


def random_event(rng: random.Random, rows: int) -> StepEvent:
    users = [f"user{i}" for i in range(4)]
    batch = [BatchRow(f"r{rng.randrange(10**6)}", rng.choice(users), rng.choice(("prefill", "decode")),
                      rng.randrange(1, 64), rng.randrange(1, 4096), rng.choice((None, rng.randrange(1, 50))))
             for _ in range(rows)]
    holders = [KVHolder(i, r.request_id, r.user, r.context) for i, r in enumerate(batch)]
    decisions = [Decision("defer", batch[0].request_id, "user_cap", {"running": 2, "cap": 2, "note": "x"},
                          batch[0].user, related=((batch[-1].request_id, batch[-1].user),))]
    return StepEvent(step=rng.randrange(1000), time=rng.random(), duration=rng.random(), rows=batch,
                     decisions=decisions, kv_capacity=4096, kv_free=rng.randrange(4096), kv_cached=0,
                     running=rows, waiting=rng.randrange(9), page_size=1,
                     page_owner=np.array([rng.randrange(-3, rows) for _ in range(64)], dtype=np.int32),
                     kv_holders=rng.choice((holders, None)))


def test_to_dict_is_the_dataclass_form_and_round_trips():
    rng = random.Random()
    for _ in range(20):
        event = random_event(rng, rng.randrange(1, 40))
        plain = dataclasses.asdict(dataclasses.replace(event, decisions=[], page_owner=None))
        plain["decisions"] = [d.to_dict() for d in event.decisions]
        plain["page_owner"] = event.page_owner.tolist()
        assert event.to_dict() == plain
        assert json.dumps(event.to_dict()) == json.dumps(plain)  # same keys in the same order
        assert StepEvent.from_dict(json.loads(json.dumps(event.to_dict()))).to_dict() == plain


def test_a_redacted_row_is_the_row_with_an_alias_and_no_user_nor_grammar():
    rng = random.Random()
    for _ in range(20):
        event = dataclasses.replace(random_event(rng, rng.randrange(1, 40)), page_owner=None)
        aliases = {}
        view = event.redacted_for("user0", aliases)
        expected = [r if r.user == "user0" else
                    dataclasses.replace(r, request_id=aliases[r.request_id], user="other", allowed_tokens=None)
                    for r in event.rows]
        assert view.rows == expected
        if event.kv_holders is not None:
            assert view.kv_holders == [
                h if h.user == "user0" else dataclasses.replace(h, request_id=aliases[h.request_id], user="other")
                for h in event.kv_holders]
        assert all(a.startswith("other-") for a in aliases.values())
        assert event.redacted_for("user0", aliases) == view  # aliases are stable for one reader
