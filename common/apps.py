from django.apps import AppConfig


class CommonConfig(AppConfig):
    name = "common"
    verbose_name = "Accounts and platform plumbing"

    def ready(self):
        # Start-up wiring: a revoked login closes its open sockets (common.consumers).
        from common import hooks
        from common.consumers import sockets_recheck_login

        hooks.on_login_revoked(sockets_recheck_login)
