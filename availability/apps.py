from django.apps import AppConfig


class AvailabilityConfig(AppConfig):
    name = "availability"

    def ready(self):
        # Start-up wiring: a revoked login leaves the location fast lane's token cache at once.
        from availability import live
        from common import hooks

        hooks.on_login_revoked(live.driver_auth_forget_for_user)
        # A deactivated login's driver goes offline after the deactivation commits.
        from workflows.drivers import deactivated_drivers_mark_offline

        hooks.on_user_deactivated(deactivated_drivers_mark_offline)
