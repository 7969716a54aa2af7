"""common.lanes.FairLane: turns shared fairly among callers, cancellation-safe."""
import asyncio

from asgiref.sync import async_to_sync

from common.lanes import FairLane


def run(scenario):
    return async_to_sync(scenario)()


def test_a_caller_alone_takes_every_free_turn():
    async def scenario():
        lane = FairLane(3)
        for _ in range(3):
            assert not lane.seat("a").locked()
            await lane.seat("a").acquire()
        return lane.locked(), lane.seat("b").locked(), dict(lane.held)

    assert run(scenario) == (True, True, {"a": 3})


def test_a_freed_turn_goes_to_the_caller_holding_fewest_not_to_the_first_waiter():
    async def scenario():
        lane, order = FairLane(2), []

        async def take(key, name):
            await lane.seat(key).acquire()
            order.append(name)

        await take("a", "a1")
        await take("a", "a2")
        waiters = [asyncio.ensure_future(take("a", "a3")), asyncio.ensure_future(take("a", "a4"))]
        await asyncio.sleep(0)
        waiters.append(asyncio.ensure_future(take("b", "b1")))
        await asyncio.sleep(0)
        lane.seat("a").release()  # a1 done: b holds none, a one
        await asyncio.sleep(0)
        first = list(order)
        lane.seat("a").release()  # a2 done: a and b hold one each; a3 waited longest
        await asyncio.sleep(0)
        second = list(order)
        lane.seat("b").release()
        await asyncio.gather(*waiters)
        return first, second, order

    first, second, order = run(scenario)
    assert first == ["a1", "a2", "b1"]
    assert second == ["a1", "a2", "b1", "a3"]
    assert order == ["a1", "a2", "b1", "a3", "a4"]


def test_a_waiter_that_leaves_is_skipped_and_the_lane_does_not_stall():
    async def scenario():
        lane = FairLane(1)
        await lane.seat("a").acquire()
        gone = asyncio.ensure_future(lane.seat("b").acquire())
        stays = asyncio.ensure_future(lane.seat("c").acquire())
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        lane.seat("a").release()
        await asyncio.wait_for(stays, 1)
        return dict(lane.held), lane.waiting

    assert run(scenario) == ({"c": 1}, {})


def test_a_waiter_cancelled_just_after_its_turn_came_hands_the_turn_on():
    async def scenario():
        lane = FairLane(1)
        await lane.seat("a").acquire()
        given = asyncio.ensure_future(lane.seat("b").acquire())
        after = asyncio.ensure_future(lane.seat("c").acquire())
        await asyncio.sleep(0)
        lane.seat("a").release()  # b's turn: its future is resolved, the task not yet resumed
        given.cancel()
        await asyncio.sleep(0)
        await asyncio.wait_for(after, 1)
        return given.cancelled(), dict(lane.held)

    assert run(scenario) == (True, {"c": 1})


def test_a_newcomer_behind_waiters_who_all_left_takes_the_free_turn_at_once():
    async def scenario():
        lane = FairLane(1)
        await lane.seat("a").acquire()
        gone = asyncio.ensure_future(lane.seat("b").acquire())
        await asyncio.sleep(0)
        lane.seat("a").release()
        gone.cancel()  # given the turn, gone before it ran: handed on to nobody
        await asyncio.sleep(0)
        return lane.seat("c").locked(), await asyncio.wait_for(lane.seat("c").acquire(), 1), dict(lane.held)

    assert run(scenario) == (False, True, {"c": 1})


# ------------------------------------------------------------------ FairGate (threads)


def test_the_gate_gives_a_freed_slot_to_the_caller_holding_fewest_and_times_out_cleanly():
    import threading

    from common.lanes import FairGate

    gate, order = FairGate(2), []
    assert gate.acquire("a", timeout=1) and gate.acquire("a", timeout=1)  # alone: both slots

    def wait_for_turn(key, name):
        if gate.acquire(key, timeout=5):
            order.append(name)

    a3 = threading.Thread(target=wait_for_turn, args=("a", "a3"))
    a3.start()
    while not gate.waiting:
        pass
    b1 = threading.Thread(target=wait_for_turn, args=("b", "b1"))
    b1.start()
    while len(gate.waiting) < 2:
        pass
    gate.release("a")  # b holds none, a one: b's turn, though a3 came first
    b1.join(5)
    assert order == ["b1"] and a3.is_alive()
    gate.release("a")
    a3.join(5)
    assert order == ["b1", "a3"]

    assert gate.acquire("c", timeout=0.01) is False  # both slots held: no turn in time
    assert gate.waiting == [] and dict(gate.held) == {"a": 1, "b": 1}
    gate.release("a")
    gate.release("b")
    assert gate.busy == 0 and dict(gate.held) == {}
