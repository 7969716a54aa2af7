from django.apps import AppConfig


class CommonConfig(AppConfig):
    name = "common"
    verbose_name = "Accounts and platform plumbing"

    def ready(self):
        # Start-up wiring: a revoked login closes its open sockets (common.consumers).
        from django.contrib.auth.signals import user_logged_out

        from common import hooks
        from common.consumers import session_logged_out, sockets_recheck_login

        hooks.on_login_revoked(sockets_recheck_login)
        user_logged_out.connect(session_logged_out, dispatch_uid="common.session_logged_out")
