from django.apps import AppConfig


class CommonConfig(AppConfig):
    name = "common"
    verbose_name = "Accounts and platform plumbing"

    def ready(self):
        # Start-up wiring: a revoked or changed login re-checks its open sockets (common.consumers).
        from django.contrib.auth import get_user_model
        from django.contrib.auth.signals import user_logged_out
        from django.contrib.auth.models import Group
        from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete

        from common import hooks
        from common.consumers import session_logged_out, sockets_recheck_login

        hooks.on_login_revoked(sockets_recheck_login)
        user_logged_out.connect(session_logged_out, dispatch_uid="common.session_logged_out")
        user = get_user_model()
        post_save.connect(hooks.user_saved, sender=user, dispatch_uid="common.user_saved")
        post_delete.connect(hooks.user_deleted, sender=user, dispatch_uid="common.user_deleted")
        m2m_changed.connect(hooks.user_groups_changed, sender=user.groups.through,
                            dispatch_uid="common.user_groups_changed")
        pre_delete.connect(hooks.group_deleting, sender=Group, dispatch_uid="common.group_deleting")
        for signal in (post_save, post_delete):
            signal.connect(hooks.group_changed, sender=Group, dispatch_uid=f"common.group_changed.{id(signal)}")
            signal.connect(hooks.api_token_changed, sender="common.ApiToken", dispatch_uid=f"common.api_token_changed.{id(signal)}")
