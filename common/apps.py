from django.apps import AppConfig


class CommonConfig(AppConfig):
    name = "common"
    verbose_name = "Accounts and platform plumbing"

    def ready(self):
        # Start-up wiring: a revoked or changed login re-checks its open sockets (common.consumers).
        from django.contrib.auth import get_user_model
        from django.contrib.auth.signals import user_logged_out
        from django.db.models.signals import m2m_changed, post_save

        from common import hooks
        from common.consumers import session_logged_out, sockets_recheck_login

        hooks.on_login_revoked(sockets_recheck_login)
        user_logged_out.connect(session_logged_out, dispatch_uid="common.session_logged_out")
        user = get_user_model()
        post_save.connect(hooks.user_saved, sender=user, dispatch_uid="common.user_saved")
        m2m_changed.connect(hooks.user_groups_changed, sender=user.groups.through,
                            dispatch_uid="common.user_groups_changed")
