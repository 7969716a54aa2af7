import pytest

from tests.notifications.receiver import Receiver


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def no_worker():
    """Tasks enqueued on commit go to the broker (Redis) and no worker takes them: as if the
    worker was down or killed before it ran them."""
    from config.celery import app

    previous = app.conf.task_always_eager
    app.conf.task_always_eager = False
    yield
    app.conf.task_always_eager = previous


@pytest.fixture
def broker_down():
    """Redis, the broker, is unreachable at commit: every enqueue fails (and is logged)."""
    from config.celery import app

    saved = (app.conf.task_always_eager, app.conf.broker_url, app.conf.task_publish_retry, app._pool)
    app.conf.task_always_eager, app.conf.broker_url, app.conf.task_publish_retry = False, "redis://127.0.0.1:1/0", False
    app._pool = None
    yield
    if app._pool is not None:
        app._pool.force_close_all()
    app.conf.task_always_eager, app.conf.broker_url, app.conf.task_publish_retry, app._pool = saved
