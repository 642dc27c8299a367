"""The engine process's end of `serve --api-server-count N` (engine_core.py): whatever the number of
front ends with event readers, one subscription feeds them all, each event is pickled once, and the
page map goes only to front ends that asked for it (issue 8)."""

import asyncio
import pickle

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")
import zmq.asyncio  # noqa: E402

from lightllm_nb.serving.engine_core import EngineCore  # noqa: E402
from lightllm_nb.serving.event_wire import unpack  # noqa: E402
from lightllm_nb.telemetry.events import BatchRow, StepEvent  # noqa: E402
from lightllm_nb.telemetry.hub import EventHub  # noqa: E402


class HubDriver:
    """The part of a DriverLoop that EngineCore's events use: its hub's subscribe."""

    def __init__(self):
        self.hub = EventHub()

    def subscribe(self, **options):
        return self.hub.subscribe(**options)


def a_step(step: int) -> StepEvent:
    return StepEvent(step=step, time=0.0, duration=0.01, rows=[BatchRow("r-1", "alice", "decode", 1, 5)],
                     decisions=[], kv_capacity=8, kv_free=3, kv_cached=0, running=1, waiting=0, page_size=1)


async def until(condition, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def front_ends_reading_events(tmp_path):
    driver = HubDriver()
    address = f"ipc://{tmp_path}/engine.sock"
    core = EngineCore(driver, address, front_ends=[101, 102])
    serving = asyncio.get_running_loop().create_task(core.serve())
    context = zmq.asyncio.Context()
    sockets = {}
    for pid in (101, 102):
        sockets[pid] = context.socket(zmq.DEALER)
        sockets[pid].setsockopt(zmq.IDENTITY, str(pid).encode())
        sockets[pid].setsockopt(zmq.LINGER, 0)
        sockets[pid].connect(address)
    try:
        sockets[101].send(pickle.dumps(("subscribe", False, None)))
        sockets[102].send(pickle.dumps(("subscribe", True, 10.0)))
        await until(lambda: len(driver.hub) == 1 and driver.hub.demand().pages)
        await asyncio.sleep(0.1)  # the second front end's demand is in too
        yield driver, core, sockets
    finally:
        serving.cancel()
        for sock in sockets.values():
            sock.close()
        context.term()


def test_front_ends_share_one_subscription_one_pickle_and_only_askers_get_pages(tmp_path):
    async def main():
        async for driver, core, sockets in front_ends_reading_events(tmp_path):
            assert len(driver.hub) == 1
            assert driver.hub.demand().max_rate is None  # the fastest asked for: every step
            owners = np.array([0, -1, -2, 0], dtype=np.int32)
            driver.hub.publish(a_step(1), lambda: owners)
            plain = await asyncio.wait_for(sockets[101].recv_multipart(), 10)
            paged = await asyncio.wait_for(sockets[102].recv_multipart(), 10)
            assert len(plain) == 1 and len(paged) == 2
            assert plain[0] == paged[0]  # the same bytes: pickled once
            kind, packed, lost = pickle.loads(plain[0])
            assert (kind, lost) == ("event", 0) and unpack(packed) == a_step(1)
            assert np.array_equal(np.frombuffer(paged[1], dtype="<i4"), owners)

            sockets[102].send(pickle.dumps(("unsubscribe",)))
            await until(lambda: not driver.hub.demand().pages)
            assert len(driver.hub) == 1
            core.front_end_gone(b"101")
            assert len(driver.hub) == 0
    asyncio.run(main())
