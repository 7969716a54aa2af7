import pytest
from django.core.management import call_command

from availability.models import Driver
from dispatch.models import Delivery

pytestmark = pytest.mark.django_db


def test_demo_data_loads_and_is_safe_to_load_again(client, capsys):
    call_command("seed_demo")
    call_command("seed_demo")

    assert Driver.objects.count() == 12
    assert Driver.objects.filter(availability="available").count() == 8
    assert not Driver.objects.filter(location__isnull=True).exists()
    assert Delivery.objects.count() == 4
    assert client.login(username="ops", password="ops")
    out = capsys.readouterr().out
    assert "ops / ops" in out and "integration token" in out
