"""Run calls at the same moment in real threads (with real transactions)."""
import threading
import time
from contextlib import contextmanager

from django.db import connection, transaction


def race(calls):
    """Run the calls at the same moment in real threads; return (results, errors)."""
    barrier = threading.Barrier(len(calls))
    results, errors = [], []

    def run(fn):
        try:
            barrier.wait()
            results.append(fn())
        except Exception as exc:  # collected and asserted on by the test
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(fn,)) for fn in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results, errors


@contextmanager
def held_elsewhere(hold, timeout=10):
    """While the block runs, another transaction (in its own thread) holds what `hold()` locked:
    for code that must skip such rows, never wait for them."""
    held, release, outcome = threading.Event(), threading.Event(), {}

    def holder():
        try:
            with transaction.atomic():
                hold()
                held.set()
                release.wait(timeout)
        except Exception as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc
            held.set()
        finally:
            connection.close()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(timeout)
        if "error" in outcome:
            raise outcome["error"]
        yield
    finally:
        release.set()
        thread.join(timeout)


def behind_lock(hold, call, timeout=10, while_blocked=None):
    """Run `call` while another transaction holds what it needs, deterministically.

    `hold()` runs in its own thread inside a transaction (it takes its locks and writes); once it
    has returned, `call()` starts in a second thread, and only when PostgreSQL shows a session
    waiting on a lock does the first transaction commit; `while_blocked()`, if given, runs in that
    transaction (in a savepoint) just before. Returns what `call()` returned (an exception it
    raised is raised here)."""
    held, release, outcome = threading.Event(), threading.Event(), {}

    def holder():
        try:
            with transaction.atomic():
                hold()
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_backend_pid()")
                    outcome["holder_pid"] = cursor.fetchone()[0]
                held.set()
                release.wait(timeout)
                if while_blocked is not None:
                    with transaction.atomic():
                        while_blocked()
        except Exception as exc:  # re-raised below, in the test's thread
            outcome["hold_error"] = exc
            held.set()
        finally:
            connection.close()

    def caller():
        try:
            outcome["result"] = call()
        except Exception as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc
        finally:
            connection.close()

    first = threading.Thread(target=holder)
    first.start()
    assert held.wait(timeout), "the holding transaction did not get its locks"
    if "hold_error" in outcome:
        raise outcome["hold_error"]
    second = threading.Thread(target=caller)
    second.start()
    deadline = time.monotonic() + timeout
    while not _blocked_by(outcome["holder_pid"]) and second.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    first.join(timeout)
    second.join(timeout)
    if "error" in outcome:
        raise outcome["error"]
    assert "result" in outcome, "the call did not finish"
    return outcome["result"]


def _blocked_by(pid: int) -> int:
    """Sessions waiting on a lock this backend holds (not any test's, anywhere on the server)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", [pid])
        return cursor.fetchone()[0]


def hold_driver_row(driver):
    """A thread's transaction holding the driver's row (as a batch of location fixes being
    written does, for milliseconds), once this returns: (thread, release), the thread commits
    when `release` is set."""
    from availability.models import Driver

    held, release = threading.Event(), threading.Event()

    def hold():
        try:
            with transaction.atomic():
                list(Driver.objects.select_for_update().filter(pk=driver.pk))
                held.set()
                release.wait(20)
        finally:
            connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(10)
    return thread, release
