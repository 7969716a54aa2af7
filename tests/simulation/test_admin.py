"""Ops start a simulation from the admin: the add page is the start form, a Celery task runs
it (eager in tests), the run's page shows its progress, and the report downloads when done."""
import pytest
from django.conf import settings
from django.test import Client

from common.redis import get_redis
from simulation import services
from simulation.admin import SimulationStartForm
from simulation.models import SimulationRun, SimulationStatus
from tests.factories import OpsUserFactory, UserFactory


@pytest.fixture
def admin_client(db):
    client = Client()
    client.force_login(OpsUserFactory(is_superuser=True))
    return client


FORM = {"drivers": "20", "orders_per_hour": "60", "minutes": "10", "seed": "7", "policies": ["sequential"], "city": "demo"}


@pytest.mark.timeout(600)
@pytest.mark.django_db(transaction=True)
def test_start_runs_the_task_and_the_report_downloads(admin_client):
    get_redis(settings.SIMULATION_REDIS_URL).flushdb()
    response = admin_client.post("/admin/simulation/simulationrun/add/", FORM)
    assert response.status_code == 302, response.content[:2000]

    run = SimulationRun.objects.get()
    assert run.status == SimulationStatus.DONE, run.error
    assert run.progress == 100
    assert run.parameters == {"drivers": 20, "ordersPerHour": 60, "minutes": 10, "seed": 7, "policies": ["sequential"],
                              "stacking": False, "city": "demo"}
    assert run.result["assignmentRate"] > 0 and run.result["seed"] == 7
    assert run.started_at <= run.finished_at and run.runtime_seconds > 0
    assert run.started_at <= run.heartbeat_at <= run.finished_at

    page = admin_client.get(f"/admin/simulation/simulationrun/{run.pk}/change/")
    assert page.status_code == 200
    assert b"assignmentRate" in page.content and b'http-equiv="refresh"' not in page.content
    listing = admin_client.get("/admin/simulation/simulationrun/")
    assert f"/admin/simulation/simulationrun/{run.pk}/report/".encode() in listing.content

    report = admin_client.get(f"/admin/simulation/simulationrun/{run.pk}/report/")
    assert report.status_code == 200
    assert report["Content-Disposition"] == f'attachment; filename="simulation-{run.pk}.html"'
    assert report.content.startswith(b"<!DOCTYPE html>") and b"data:image/png;base64," in report.content


def test_a_running_run_shows_its_progress_and_has_no_report_yet(admin_client):
    run = SimulationRun.objects.create(
        parameters={**services_params(), "policies": ["sequential", "batch"]}, status=SimulationStatus.RUNNING,
        progress=42, stage="batch",
    )
    page = admin_client.get(f"/admin/simulation/simulationrun/{run.pk}/change/")
    assert page.status_code == 200
    assert b'<progress max="100" value="42">' in page.content and b'http-equiv="refresh"' in page.content
    assert admin_client.get(f"/admin/simulation/simulationrun/{run.pk}/report/").status_code == 404


def test_a_run_whose_worker_stopped_is_shown_failed_not_running_for_ever(admin_client):
    """Nothing moved a running run on when its worker died (restarted, out of memory, killed at
    its time limit): its page refreshed every 5 s for ever. Silent for 15 minutes, it fails."""
    from datetime import timedelta

    import time_machine
    from django.utils import timezone

    with time_machine.travel("2026-12-01T10:00:00Z", tick=False) as clock:
        alive = SimulationRun.objects.create(parameters=services_params(), status=SimulationStatus.RUNNING,
                                             started_at=timezone.now(), heartbeat_at=timezone.now())
        lost = SimulationRun.objects.create(parameters=services_params(), status=SimulationStatus.RUNNING,
                                            started_at=timezone.now(), heartbeat_at=timezone.now())
        clock.shift(timedelta(minutes=14))
        SimulationRun.objects.filter(pk=alive.pk).update(heartbeat_at=timezone.now())
        assert admin_client.get("/admin/simulation/simulationrun/").status_code == 200
        assert set(SimulationRun.objects.values_list("status", flat=True)) == {SimulationStatus.RUNNING}
        clock.shift(timedelta(minutes=1, seconds=1))
        page = admin_client.get(f"/admin/simulation/simulationrun/{lost.pk}/change/")
    assert page.status_code == 200 and b'http-equiv="refresh"' not in page.content
    assert b"no sign of it for 15 minutes" in page.content
    alive.refresh_from_db(), lost.refresh_from_db()
    assert (alive.status, lost.status) == (SimulationStatus.RUNNING, SimulationStatus.FAILED)
    assert lost.finished_at is not None


def test_a_figure_a_run_could_not_compute_reads_a_dash(admin_client):
    run = SimulationRun.objects.create(parameters=services_params(), status=SimulationStatus.DONE,
                                       result={"policy": "sequential", "assignmentRate": 1.0, "driverUtilization": None})
    page = admin_client.get(f"/admin/simulation/simulationrun/{run.pk}/change/").content.decode()
    assert "<th>driverUtilization</th><td>–</td>" in page and "None" not in page.split("figures")[-1]


def test_bad_parameters_are_form_errors_and_start_nothing(admin_client):
    response = admin_client.post("/admin/simulation/simulationrun/add/", {**FORM, "drivers": "0", "policies": []})
    assert response.status_code == 200
    assert b"errorlist" in response.content
    assert not SimulationRun.objects.exists()
    with pytest.raises(services.InvalidInput):
        services.run_create(parameters={**services_params(), "policies": ["nope"]}, user=None)


def test_a_run_that_cannot_finish_within_the_workers_time_limit_is_a_form_error(admin_client, settings):
    """5,000 drivers, 50,000 orders/h for 240 min and four policies passed: 800,000 orders, hours
    of the only simulation worker, then killed at SIMULATION_TASK_TIME_LIMIT."""
    settings.SIMULATION_TASK_TIME_LIMIT = 3 * 3600  # about 54,000 orders
    too_many = {**FORM, "drivers": "1000", "orders_per_hour": "20000", "minutes": "60",
                "policies": ["sequential", "batch", "broadcast"]}

    response = admin_client.post("/admin/simulation/simulationrun/add/", too_many)

    assert response.status_code == 200
    assert "This run simulates 60,000 orders (all policies together)" in response.content.decode()
    assert not SimulationRun.objects.exists()
    overloaded = {**FORM, "drivers": "20", "orders_per_hour": "13500", "minutes": "60"}  # 675 orders/h a driver
    assert "More than 20 orders an hour per driver" in admin_client.post(
        "/admin/simulation/simulationrun/add/", overloaded).content.decode()
    fits = {**too_many, "policies": ["sequential", "batch"]}  # 40,000: the form takes it (not started here)
    form = SimulationStartForm(data=fits)
    assert form.is_valid(), form.errors


def test_the_report_needs_admin_access(db):
    run = SimulationRun.objects.create(parameters=services_params(), status=SimulationStatus.DONE, report_html="<p>x</p>")
    client = Client()
    client.force_login(UserFactory())
    response = client.get(f"/admin/simulation/simulationrun/{run.pk}/report/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


@pytest.mark.django_db(transaction=True)
def test_a_run_that_fails_records_its_error(monkeypatch):
    run = SimulationRun.objects.create(parameters=services_params())

    def boom(*args, **kwargs):
        raise RuntimeError("city on fire")

    monkeypatch.setattr(services, "run", boom)
    assert services.run_execute(run.pk) == SimulationStatus.FAILED
    run.refresh_from_db()
    assert run.status == SimulationStatus.FAILED and run.error == "RuntimeError: city on fire"
    assert services.run_execute(run.pk) == SimulationStatus.FAILED  # not started twice


def services_params() -> dict:
    return {"drivers": 20, "ordersPerHour": 60, "minutes": 10, "seed": 7, "policies": ["sequential"], "stacking": False,
            "city": "demo"}


def test_a_dispatcher_starts_simulations_and_a_viewer_reads_them(db):
    """The simulator is the tool for choosing a zone's policy, which Dispatchers change; only
    superusers could open it."""
    from common.groups import groups_sync
    from common.roles import DISPATCHER_GROUP, VIEWER_GROUP

    run = SimulationRun.objects.create(parameters={**services_params(), "policies": ["sequential"]},
                                       status=SimulationStatus.DONE, report_html="<!DOCTYPE html><p>r</p>")
    clients = {}
    for group in (DISPATCHER_GROUP, VIEWER_GROUP):
        user = UserFactory(is_staff=True)
        user.groups.add(groups_sync()[group])
        clients[group] = Client()
        clients[group].force_login(user)

    dispatcher, viewer = clients[DISPATCHER_GROUP], clients[VIEWER_GROUP]
    for client in (dispatcher, viewer):
        assert client.get("/admin/simulation/simulationrun/").status_code == 200
        assert client.get(f"/admin/simulation/simulationrun/{run.pk}/report/").status_code == 200
    assert dispatcher.get("/admin/simulation/simulationrun/add/").status_code == 200
    assert viewer.get("/admin/simulation/simulationrun/add/").status_code == 403
    assert dispatcher.post(f"/admin/simulation/simulationrun/{run.pk}/delete/", {"post": "yes"}).status_code == 403


@pytest.mark.django_db(transaction=True)  # (the run is read on a connection of its own)
def test_a_run_deleted_while_it_runs_stops_at_its_next_step(monkeypatch):
    """Deleting a running run left it running to its end (hours of the only simulation worker)."""
    run = SimulationRun.objects.create(parameters={**services_params(), "policies": ["sequential"]})
    steps = []

    def simulated(base, policies, *, progress):
        progress(0.1, "sequential")
        steps.append(0.1)
        SimulationRun.objects.filter(pk=run.pk).delete()  # ops delete it in the admin meanwhile
        progress(0.2, "sequential")
        steps.append(0.2)  # never reached
        raise AssertionError("the run went on")

    monkeypatch.setattr(services, "run", simulated)

    assert services.run_execute(run.pk) == "deleted"
    assert steps == [0.1]
