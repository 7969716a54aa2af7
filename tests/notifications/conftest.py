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


@pytest.fixture
def smtp_server(settings):
    """A real SMTP server (aiosmtpd) on 127.0.0.1; Django's SMTP backend sends to it. Yields
    the list of envelopes it received."""
    import socket

    from aiosmtpd.controller import Controller

    received = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            received.append(envelope)
            return "250 Message accepted for delivery"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_USE_TLS = "127.0.0.1", port, False
    settings.EMAIL_HOST_USER = settings.EMAIL_HOST_PASSWORD = ""
    yield received
    controller.stop()


@pytest.fixture
def twilio(settings):
    """A local server answering like Twilio's Messages API (201 with the message resource),
    and the Twilio backend pointed at it."""
    from tests.notifications.receiver import Answer

    server = Receiver()
    server.default = Answer(201, {"Content-Type": "application/json"}, b'{"sid": "SM00000000000000000000000000000001", "status": "queued"}')
    settings.CUSTOMER_SMS_BACKEND = "notifications.sms.TwilioSmsBackend"
    settings.TWILIO_API_BASE = f"http://127.0.0.1:{server.server.server_address[1]}"
    settings.TWILIO_ACCOUNT_SID, settings.TWILIO_AUTH_TOKEN, settings.TWILIO_FROM_NUMBER = "AC123", "secret-token", "+15005550006"
    yield server
    server.close()
