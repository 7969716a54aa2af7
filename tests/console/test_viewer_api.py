"""A Viewer (the console's read-only role, common/groups.py) is ops for reads only, through the
API as in the admin: every write operation of the OpenAPI schema refuses its token with 403."""
import re
import uuid

import pytest
from django.contrib.auth.models import Group

from common.roles import VIEWER_GROUP
from tests.api import assert_error, client_for
from tests.common.test_hostile_input import ANONYMOUS_OPERATIONS, write_operations
from tests.factories import DeliveryFactory, OpsUserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def viewer():
    user = OpsUserFactory()
    user.groups.add(Group.objects.get_or_create(name=VIEWER_GROUP)[0])
    return user


def test_a_viewer_reads_like_ops(viewer):
    delivery = DeliveryFactory()
    client = client_for(viewer)
    assert client.get("/v2/deliveries").status_code == 200
    assert client.get(f"/v2/deliveries/{delivery.pk}").status_code == 200
    assert client.get("/v2/drivers").status_code == 200


@pytest.mark.parametrize(
    ("method", "template"),
    [pytest.param(m, t, id=f"{m.upper()} {t}") for m, t, _ in write_operations() if t not in ANONYMOUS_OPERATIONS],
)
def test_every_write_refuses_a_viewer(viewer, method, template):
    delivery = DeliveryFactory()
    path = re.sub(r"\{delivery_id\}|\{id\}", str(delivery.pk), template)
    path = re.sub(r"\{step\}", "pickup-started", path)
    path = re.sub(r"\{[a-z_]+\}", str(uuid.uuid4()), path)

    r = getattr(client_for(viewer), method)(path, {}, format="json")

    assert_error(r, 403)


def test_the_same_writes_are_open_to_a_dispatcher(db):
    """The rule is the Viewer's, not every staff login's."""
    delivery = DeliveryFactory()
    r = client_for(OpsUserFactory()).post(f"/v2/deliveries/{delivery.pk}/cancel", {"reason": "test"}, format="json")
    assert r.status_code == 200, r.content
