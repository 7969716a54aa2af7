"""`common.redis.ScriptBatcher`: a Lua script's calls made together go out as one pipeline, each
caller with its own reply or error, against the real Redis."""
import asyncio
import socket

import pytest
import redis
import redis.asyncio as aioredis
from django.conf import settings

from common.redis import ScriptBatcher

# Appends ARGV[1] to the list KEYS[1]; returns the new length. On a key holding a string it
# fails (WRONGTYPE), only that call.
SCRIPT = "return redis.call('RPUSH', KEYS[1], ARGV[1])"


def run(coro_fn):
    async def main():
        client = aioredis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
        try:
            return await coro_fn(client)
        finally:
            await client.aclose()
    return asyncio.run(main())


def counting(batcher: ScriptBatcher) -> list[int]:
    """The size of every pipeline the batcher sends."""
    sizes = []
    original = batcher._pipeline

    async def pipeline(calls):
        sizes.append(len(calls))
        return await original(calls)

    batcher._pipeline = pipeline
    return sizes


def test_calls_made_together_share_one_pipeline_and_each_gets_its_own_reply():
    async def go(client):
        await client.delete("sb:a", "sb:b")
        batcher = ScriptBatcher.for_client(client, SCRIPT, timeout=2)
        assert ScriptBatcher.for_client(client, SCRIPT, timeout=2) is batcher
        await client.script_load(SCRIPT)  # (else the first pipeline is answered NOSCRIPT and sent again)
        sizes = counting(batcher)
        replies = await asyncio.gather(*(batcher.call([f"sb:{'ab'[i % 2]}"], [i]) for i in range(10)))
        later = await batcher.call(["sb:a"], ["x"])
        return replies, later, sizes, await client.lrange("sb:a", 0, -1)

    replies, later, sizes, stored = run(go)
    assert replies == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # each call atomic, in the order made
    assert later == 6 and stored == ["0", "2", "4", "6", "8", "x"]
    # (another xdist worker's SCRIPT FLUSH, tests of a Redis restart, may land between the load
    # and a pipeline: the Redis script cache is the server's, and the missing calls go again)
    assert sizes in ([10, 1], [10, 10, 1], [10, 1, 1])


def test_one_failing_call_fails_alone():
    async def go(client):
        await client.delete("sb:list")
        await client.set("sb:string", "not a list")
        batcher = ScriptBatcher.for_client(client, SCRIPT, timeout=2)
        return await asyncio.gather(
            batcher.call(["sb:list"], ["a"]), batcher.call(["sb:string"], ["b"]), batcher.call(["sb:list"], ["c"]),
            return_exceptions=True,
        )

    first, failed, third = run(go)
    assert (first, third) == (1, 2)
    assert isinstance(failed, redis.ResponseError) and "WRONGTYPE" in str(failed)


def test_a_redis_that_forgot_the_script_gets_it_loaded_once_and_the_calls_succeed():
    async def go(client):
        await client.delete("sb:flushed")
        batcher = ScriptBatcher.for_client(client, SCRIPT, timeout=2)
        await batcher.call(["sb:flushed"], ["warm"])
        await client.script_flush()
        sizes = counting(batcher)
        replies = await asyncio.gather(*(batcher.call(["sb:flushed"], [i]) for i in range(3)))
        return replies, sizes

    replies, sizes = run(go)
    assert replies == [2, 3, 4]
    assert sizes == [3, 3]  # NOSCRIPT for all three, loaded, sent again


def test_a_hung_redis_fails_every_waiting_call_after_the_timeout_and_a_caller_that_gave_up_harms_no_one():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)

    async def go(_client):
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", socket_timeout=None)
        try:
            batcher = ScriptBatcher.for_client(client, SCRIPT, timeout=0.3)
            impatient = asyncio.ensure_future(batcher.call(["k"], [0]))
            waiting = [asyncio.ensure_future(batcher.call(["k"], [i])) for i in range(3)]
            await asyncio.sleep(0.05)
            impatient.cancel()
            results = await asyncio.gather(*waiting, return_exceptions=True)
            return results, batcher.running, batcher.pending
        finally:
            await client.aclose()

    try:
        results, running, pending = run(go)
    finally:
        silent.close()
    assert all(isinstance(r, TimeoutError) for r in results), results
    assert running is None and pending == []  # the next call starts a new pipeline


@pytest.mark.parametrize("n", [1, 200])
def test_replies_go_to_their_callers_whatever_the_batch_size(n):
    async def go(client):
        await client.delete(*[f"sb:n{i}" for i in range(n)])
        batcher = ScriptBatcher.for_client(client, SCRIPT, timeout=2)
        return await asyncio.gather(*(batcher.call([f"sb:n{i}"], [i]) for i in range(n)))

    assert run(go) == [1] * n
