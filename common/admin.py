from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from common.models import User


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    list_filter = ("is_staff", "is_active", "groups")
