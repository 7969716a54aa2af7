from django.shortcuts import redirect


def home(request):
    """`/`: staff to the ops console, everyone else to the API docs."""
    user = request.user
    return redirect("admin:index" if user.is_authenticated and user.is_active and user.is_staff else "docs")
