"""The engine process's end of `serve --api-server-count N` (engine_core.py): whatever the number of
front ends with event readers, one subscription feeds them all, each event is pickled once, and the
page map goes only to front ends that asked for it (issue 8)."""

import asyncio
import pickle

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")
import zmq.asyncio  # noqa: E402

from lightllm_nb.serving.engine_core import EngineCore, event_address  # noqa: E402
from lightllm_nb.serving.event_wire import unpack  # noqa: E402
from lightllm_nb.telemetry.events import BatchRow, StepEvent  # noqa: E402
from lightllm_nb.telemetry.hub import Demand, EventHub  # noqa: E402


class HubDriver:
    """The parts of a DriverLoop these tests use: its hub's subscribe, and an abort of nothing."""

    def __init__(self):
        self.hub = EventHub()

    def subscribe(self, **options):
        return self.hub.subscribe(**options)

    def abort(self, request_id, *, user):
        return False


def a_step(step: int) -> StepEvent:
    return StepEvent(step=step, time=0.0, duration=0.01, rows=[BatchRow("r-1", "alice", "decode", 1, 5)],
                     decisions=[], kv_capacity=8, kv_free=3, kv_cached=0, running=1, waiting=0, page_size=1)


async def until(condition, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def engine_with_front_ends(tmp_path):
    """An EngineCore with two front ends' sockets: their DEALERs and their event SUBs (subscribed to
    no topic yet)."""
    driver = HubDriver()
    address = f"ipc://{tmp_path}/engine.sock"
    core = EngineCore(driver, address, front_ends=[101, 102])
    serving = asyncio.get_running_loop().create_task(core.serve())
    context = zmq.asyncio.Context()
    dealers, subs = {}, {}
    for pid in (101, 102):
        dealers[pid] = context.socket(zmq.DEALER)
        dealers[pid].setsockopt(zmq.IDENTITY, str(pid).encode())
        dealers[pid].connect(address)
        subs[pid] = context.socket(zmq.SUB)
        subs[pid].connect(event_address(address))
    try:
        yield driver, core, dealers, subs
    finally:
        serving.cancel()
        for sock in [*dealers.values(), *subs.values()]:
            sock.close(linger=0)
        context.term()


async def receive(sock, timeout=0.2):
    if await sock.poll(timeout * 1000):
        return await sock.recv_multipart()
    return None


def test_front_ends_share_one_subscription_one_pickle_and_only_askers_get_pages(tmp_path):
    async def main():
        async for driver, core, dealers, subs in engine_with_front_ends(tmp_path):
            dealers[101].send(pickle.dumps(("subscribe", False, None)))
            subs[101].setsockopt(zmq.SUBSCRIBE, b"e")
            dealers[102].send(pickle.dumps(("subscribe", True, 10.0)))
            subs[102].setsockopt(zmq.SUBSCRIBE, b"p")
            await until(lambda: len(core._demands) == 2)
            assert len(driver.hub) == 1
            assert driver.hub.demand() == Demand(pages=True, max_rate=None)  # every step: the fastest asked
            owners = np.array([0, -1, -2, 0], dtype=np.int32)
            heard = set()
            for step in range(1, 200):  # a SUB hears a publisher only a moment after it subscribed
                driver.hub.publish(a_step(step), lambda: owners)
                for pid in (101, 102):
                    if await receive(subs[pid]) is not None:
                        heard.add(pid)
                if len(heard) == 2:
                    break
            for pid in (101, 102):  # what else was on its way
                while await receive(subs[pid]) is not None:
                    pass
            driver.hub.publish(a_step(1000), lambda: owners)
            got = {pid: await receive(subs[pid], 10) for pid in (101, 102)}
            plain, paged = got[101], got[102]
            assert plain[0] == b"e" and len(plain) == 2 and paged[0] == b"p" and len(paged) == 3
            assert plain[1] == paged[1]  # the same bytes: pickled once
            _sequence, packed, lost = pickle.loads(plain[1])
            assert lost == 0 and unpack(packed) == a_step(1000)
            assert np.array_equal(np.frombuffer(paged[2], dtype="<i4"), owners)

            dealers[102].send(pickle.dumps(("unsubscribe",)))
            await until(lambda: not driver.hub.demand().pages)
            assert len(driver.hub) == 1
            core.front_end_gone(b"101")
            assert len(driver.hub) == 0
    asyncio.run(main())


def test_a_front_end_that_stops_reading_for_a_while_loses_no_outputs(tmp_path):
    """zmq's default high-water mark (1000 messages each way) made the ROUTER drop, silently, what
    a stalled front end had not read yet: its requests never finished."""
    async def main():
        async for driver, core, dealers, subs in engine_with_front_ends(tmp_path):
            dealers[101].send(pickle.dumps(("abort", 0, "no-such-request", "alice")))
            answer = await receive(dealers[101], 10)  # connected both ways
            assert pickle.loads(answer[0]) == ("answer", 0, False)
            for step in range(5000):  # the front end reads nothing meanwhile
                core._send(b"101", ("outputs", [step]))
            received = []
            while (message := await receive(dealers[101], 1)) is not None:
                received.append(pickle.loads(message[0])[1][0])
            assert received == list(range(5000))
    asyncio.run(main())
