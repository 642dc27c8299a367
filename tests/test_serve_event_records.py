"""The event stream's records: each view of a step redacted and encoded once for all its sockets
(issue 8), and each user's view exactly their redacted event."""

import json

import numpy as np
import pytest

from lightllm_nb.scheduling.decisions import Decision
from lightllm_nb.serving.event_records import EventRecords
from lightllm_nb.telemetry.events import BatchRow, KVHolder, StepEvent


def a_step(pages=None) -> StepEvent:
    """alice has a row, carol only a KV holder, dave only a decision, erin only a related request."""
    rows = [BatchRow("a-1", "alice", "decode", 1, 9), BatchRow("b-1", "bob", "prefill", 4, 4)]
    holders = [KVHolder(0, "a-1", "alice", 9), KVHolder(1, "b-1", "bob", 4), KVHolder(2, "c-1", "carol", 3)]
    decisions = [Decision("defer", "d-1", "shared_prefill", {"matched": 0, "shared": 32}, "dave",
                          related=(("e-1", "erin"),)),
                 Decision("defer", "b-2", "user_cap", {"running": 2, "cap": 2}, "bob")]
    return StepEvent(step=7, time=1.0, duration=0.01, rows=rows, decisions=decisions, kv_capacity=16, kv_free=3,
                     kv_cached=0, running=3, waiting=2, page_size=1, page_owner=pages, kv_holders=holders)


@pytest.fixture
def encodings(monkeypatch):
    """How many times a view was turned into a JSON record."""
    count = [0]
    to_dict = StepEvent.to_dict

    def counted(self):
        count[0] += 1
        return to_dict(self)
    monkeypatch.setattr(StepEvent, "to_dict", counted)
    return count


def test_strangers_to_a_step_share_one_view_and_one_encoding(encodings):
    records, event = EventRecords(), a_step()
    views = [records.view(event, f"viewer{i}") for i in range(8)]
    assert all(view is views[0] for view in views)
    texts = [records.record(view, dropped=i)[0] for i, view in enumerate(views)]
    assert encodings[0] == 1
    assert [json.loads(text)["dropped"] for text in texts] == list(range(8))
    assert len({text.split(", ", 1)[1] for text in texts}) == 1


@pytest.mark.parametrize("user", ["alice", "bob", "carol", "dave", "erin", "frank", None])
def test_each_user_sees_exactly_their_redacted_step(user):
    records, event = EventRecords(), a_step()
    records.view(event, "frank")  # a stranger's view made first must not stand in for anyone else's
    view = records.view(event, user)
    assert view == (event if user is None else event.redacted_for(user, records._aliases))
    text = json.dumps(view.to_dict())
    for other in {"alice", "bob", "carol", "dave", "erin"} - {user}:
        assert other not in text or user is None


def test_aliases_are_random_and_stable_across_steps_and_sockets():
    records = EventRecords()
    first, second = records.view(a_step(), "frank"), records.view(a_step(), "alice")
    alias = first.rows[1].request_id
    assert alias.startswith("other-") and "b-1" not in alias
    assert second.rows[1].request_id == alias  # the same request, a later step, another user


def test_the_record_is_the_views_json_and_its_page_map_as_int32_bytes():
    records = EventRecords()
    owners = np.array([0, 0, 1, -1, -2, 2], dtype=np.int32)
    view = records.view(a_step(owners), "carol")
    text, pages = records.record(view, dropped=3)
    assert StepEvent.from_dict({k: v for k, v in json.loads(text).items() if k != "dropped"}) == \
        StepEvent.from_dict({**view.to_dict(), "page_owner": None})
    assert np.array_equal(np.frombuffer(pages, dtype="<i4"), owners)
    assert records.record(records.view(a_step(), "carol"), dropped=0)[1] is None
