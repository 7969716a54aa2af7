from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"

    def ready(self):
        # Start-up wiring: every live event a service emits (`common.broadcast`) is offered to
        # the webhook outbox, which writes its rows in the emitting transaction. The outbox
        # reads models, which exist only once apps are ready.
        from common.hooks import on_event_emitted
        from notifications.api.payload import delivery_representation
        from notifications.outbox import outbox_capture
        from notifications.payloads import set_delivery_renderer
        from notifications.push import push_notice_capture

        set_delivery_renderer(delivery_representation)  # the API's own view of a delivery
        on_event_emitted(outbox_capture)
        on_event_emitted(push_notice_capture)  # offer withdrawn, delivery taken away, break ended: to the phone
