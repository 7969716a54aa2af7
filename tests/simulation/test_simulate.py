"""The simulator (docs/dispatch.md, "The simulator"): small runs on the real services, in a
database and a Redis database of their own that are gone afterwards; the same seed gives the
same figures; the report is one self-contained HTML file; bad arguments are a CommandError."""
import json
import re
import time

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.db.utils import load_backend

from common import metrics
from common.broadcast import enqueue_task_on_commit, tasks_diverted
from common.exceptions import Conflict, InvalidInput
from common.redis import get_redis
from simulation import sandbox
from simulation.city import City
from simulation.metrics import METRIC_KEYS, difference, percentile
from simulation.sandbox import CLAIM_KEY

SMALL = ["--drivers", "20", "--orders-per-hour", "60", "--minutes", "10", "--seed", "7", "--no-progress"]


def _run_schemas() -> list[str]:
    """Schemas of simulation runs left in the simulation database."""
    conf = {**connection.settings_dict, "NAME": connection.settings_dict["NAME"] + "_sim"}
    conn = load_backend(conf["ENGINE"]).DatabaseWrapper(conf, "schemas_probe")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'run\\_%%'")
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def _sim_query(sql: str) -> list[tuple]:
    conf = {**connection.settings_dict, "NAME": connection.settings_dict["NAME"] + "_sim"}
    conn = load_backend(conf["ENGINE"]).DatabaseWrapper(conf, "sim_probe")
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.fixture
def sim_redis():
    client = get_redis(settings.SIMULATION_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


def _observed(histogram) -> float:
    return next(s.value for s in histogram.collect()[0].samples if s.name.endswith("_count"))


@pytest.mark.timeout(900)
@pytest.mark.django_db(transaction=True)
def test_same_seed_same_figures_and_a_self_contained_report(tmp_path, sim_redis):
    first, second, report = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "r.html"
    before = _observed(metrics.ASSIGNMENT_LATENCY), _observed(metrics.OFFER_CREATION_LATENCY)
    call_command("simulate", *SMALL, "--json", str(first), "--report", str(report))
    call_command("simulate", *SMALL, "--json", str(second))
    # the simulated city's assignments and offers are not the platform's (an admin run put
    # them into the live histograms)
    assert (_observed(metrics.ASSIGNMENT_LATENCY), _observed(metrics.OFFER_CREATION_LATENCY)) == before

    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a == b
    for key in METRIC_KEYS:
        assert key in a
    assert a["parameters"] == {"drivers": 20, "ordersPerHour": 60, "minutes": 10, "seed": 7, "policy": "sequential",
                               "stacking": False, "city": "demo"}
    assert a["seed"] == 7
    assert a["ordersCreated"] > 0 and a["offers"] >= a["ordersAssigned"] > 0
    assert sum(a["driverAnswers"].values()) == a["offers"]  # every offer reached its driver's phone
    assert 0 < a["assignmentRate"] <= 1
    assert a["meanTimeToAssignSeconds"] >= 0 and a["p95TimeToAssignSeconds"] >= a["meanTimeToAssignSeconds"] * 0.5
    assert a["meanPickupEtaSeconds"] > 0 and a["meanDeliverySeconds"] > a["meanPickupEtaSeconds"]

    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert len(re.findall(r'<img alt="" src="data:image/png;base64,[A-Za-z0-9+/=]{100,}">', html)) >= 5
    assert "<script" not in html and "<link" not in html and "url(" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)

    # nothing left behind: the run's schema is dropped, its Redis database flushed
    assert _run_schemas() == []
    assert sim_redis.dbsize() == 0
    # btree_gist lives in `public`: in a run's schema, that run's DROP SCHEMA … CASCADE took it,
    # and with it the offers' exclusion constraint of every run going on beside it
    assert _sim_query("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                      "WHERE e.extname = 'btree_gist'") == [("public",)]


@pytest.mark.timeout(900)
@pytest.mark.django_db(transaction=True)
def test_compare_runs_the_policies_side_by_side_on_the_same_city(tmp_path, sim_redis):
    out, report, series_path = tmp_path / "c.json", tmp_path / "c.html", tmp_path / "c.series.json"
    call_command("simulate", "--drivers", "10", "--orders-per-hour", "40", "--minutes", "5", "--seed", "3",
                 "--compare", "sequential,batch+stacking", "--no-progress", "--json", str(out), "--report", str(report),
                 "--series", str(series_path))
    result = json.loads(out.read_text())
    assert result["parameters"] == {"drivers": 10, "ordersPerHour": 40, "minutes": 5, "seed": 3, "city": "demo",
                                    "policies": ["sequential", "batch+stacking"]}
    assert sorted(result["runs"]) == ["batch+stacking", "sequential"]
    sequential, batch = result["runs"]["sequential"], result["runs"]["batch+stacking"]
    assert (sequential["policy"], sequential["stacking"]) == ("sequential", False)
    assert (batch["policy"], batch["stacking"]) == ("batch", True)
    assert sequential["ordersCreated"] == batch["ordersCreated"] > 0  # the same orders for both
    for key in METRIC_KEYS:
        assert key in sequential and key in batch
    html = report.read_text()
    assert "Policies side by side" in html and "batch+stacking" in html
    assert _run_schemas() == [] and sim_redis.dbsize() == 0
    # each mean against the baseline, with its 95 % interval: no winner named from noise
    compared = result["comparison"]
    assert compared["baseline"] == "sequential" and list(compared["against"]) == ["batch+stacking"]
    figures = compared["against"]["batch+stacking"]
    assert set(figures) == {"meanPickupEtaSeconds", "meanTimeToAssignSeconds", "meanDeliverySeconds"}
    for d in filter(None, figures.values()):
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
        assert d["verdict"] == ("within noise" if d["ci95"][0] <= 0 <= d["ci95"][1] else "lower" if d["ci95"][1] < 0 else "higher")
    assert "Against sequential" in html and "95 % interval" in html
    assert sequential["platformSettings"]["DISPATCH_RADIUS_KM"] == settings.DISPATCH_RADIUS_KM
    assert "DISPATCH_POLICY" not in sequential["platformSettings"]  # (the policy is the run's own)

    # The same two runs made apart (each its own `simulate --json … --series …`, e.g. two
    # processes at once) give the same side-by-side report through `simulate_report`.
    series = json.loads(series_path.read_text())
    assert sorted(series) == ["batch+stacking", "sequential"]
    parts = []
    for name in ("sequential", "batch+stacking"):
        run_json, run_series = tmp_path / f"{name}.json", tmp_path / f"{name}.series.json"
        run_json.write_text(json.dumps(result["runs"][name]))
        run_series.write_text(json.dumps({name: series[name]}))
        parts += ["--run", str(run_json), str(run_series)]
    merged, merged_report = tmp_path / "m.json", tmp_path / "m.html"
    call_command("simulate_report", *parts, "--report", str(merged_report), "--json", str(merged))
    assert json.loads(merged.read_text()) == result
    assert merged_report.read_text() == html
    # the comparison's own JSON again (written with sorted keys, its `runs` alphabetical: the
    # merge made batch+stacking the baseline)
    again = tmp_path / "again.json"
    call_command("simulate_report", "--run", str(out), str(series_path), "--report", str(tmp_path / "again.html"),
                 "--json", str(again))
    assert json.loads(again.read_text()) == result

    other = dict(result["runs"]["sequential"], parameters={**result["runs"]["sequential"]["parameters"], "seed": 4})
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(CommandError, match="only the policy may differ"):
        call_command("simulate_report", *parts[:3], "--run", str(tmp_path / "other.json"), parts[2],
                     "--report", str(tmp_path / "x.html"))
    with pytest.raises(CommandError, match="given twice"):
        call_command("simulate_report", *parts[:3], *parts[:3], "--report", str(tmp_path / "x.html"))
    # a run made with other settings (a matching window, a radius), or the series of another run
    tuned = dict(result["runs"]["batch+stacking"], platformSettings={
        **result["runs"]["batch+stacking"]["platformSettings"], "DISPATCH_MATCHING_WINDOW_SECONDS": 60})
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    with pytest.raises(CommandError, match=r"ran with other settings \(DISPATCH_MATCHING_WINDOW_SECONDS\)"):
        call_command("simulate_report", *parts[:3], "--run", str(tmp_path / "tuned.json"), parts[5],
                     "--report", str(tmp_path / "x.html"))
    stray = {"batch+stacking": {**series["batch+stacking"],
                                "parameters": {**series["batch+stacking"]["parameters"], "seed": 99}}}
    (tmp_path / "stray.series.json").write_text(json.dumps(stray))
    with pytest.raises(CommandError, match="are of another run"):
        call_command("simulate_report", *parts[:3], "--run", parts[4], str(tmp_path / "stray.series.json"),
                     "--report", str(tmp_path / "x.html"))
    with pytest.raises(CommandError, match="directory does not exist"):
        call_command("simulate_report", *parts, "--report", "/nonexistent-dir/x.html")


@pytest.mark.django_db
def test_driver_hours_count_every_minute_of_the_window():
    """Each minute's sample stands for that minute, the first included: a 10-minute run counted
    9 (its ordersPerDriverHour 10/9 too high), a 1-minute run none (null)."""
    from datetime import timedelta

    from simulation.engine import START, Params, Trace
    from simulation.metrics import collect
    from tests.factories import DeliveryFactory

    def sample(t, available, busy=0):
        return {"t": t, "counts": {"available": available, "busy": busy}, "unassigned": 0, "open": 0}

    for minute in (1, 2, 3):
        DeliveryFactory(ready_at=START, delivered_at=START + timedelta(minutes=minute), status="delivered")
    ten = Params(drivers=3, orders_per_hour=18, minutes=10, seed=1, policy="sequential")
    figures, _ = collect(ten, Trace(samples=[sample(60 * m, available=2, busy=1) for m in range(11)]))
    assert figures["ordersPerDriverHour"] == 6.0  # 3 delivered / (10 minutes × 3 drivers); 6.667 before
    assert figures["driverUtilization"] == round(1 / 3, 4)  # (minute 0, all free, left out of it)

    one = Params(drivers=2, orders_per_hour=1, minutes=1, seed=1, policy="sequential")
    figures, _ = collect(one, Trace(samples=[sample(0, available=2)]))
    assert figures["ordersPerDriverHour"] is not None and figures["driverUtilization"] is None


@pytest.mark.parametrize("platform, simulation", [
    ("redis://127.0.0.1:6379/12", "redis://localhost:6379/12"),  # (passed, and the run wiped it)
    ("redis://127.0.0.1:6379/12", "redis://127.0.0.1/12"),
    ("redis://127.0.0.1:6379?db=12", "redis://127.0.0.1:6379/12"),
])
def test_the_simulation_redis_is_never_the_platforms_whatever_the_urls_spelling(settings, platform, simulation):
    # (the guard alone: a regression must not let a run delete that database's keys)
    settings.REDIS_URL, settings.SIMULATION_REDIS_URL = platform, simulation
    with pytest.raises(InvalidInput, match="Must be another Redis database"):
        sandbox.simulation_redis_url()


def test_nor_celerys_nor_a_channel_layers(settings):
    settings.SIMULATION_REDIS_URL = "redis://localhost:6379/13"
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/13"
    with pytest.raises(InvalidInput, match="Must be another Redis database"):
        sandbox.simulation_redis_url()
    settings.CELERY_BROKER_URL = settings.REDIS_URL
    settings.CHANNEL_LAYERS = {"default": {"CONFIG": {"hosts": [("127.0.0.1", 6379)]}}}  # (channels_redis: database 0)
    settings.SIMULATION_REDIS_URL = "redis://localhost:6379/0"
    with pytest.raises(InvalidInput, match="Must be another Redis database"):
        sandbox.simulation_redis_url()
    settings.SIMULATION_REDIS_URL = "redis://127.0.0.1:6379/12"
    assert sandbox.simulation_redis_url() == "redis://127.0.0.1:6379/12"


def test_a_simulation_redis_out_of_reach_is_a_clear_command_error(settings):
    settings.SIMULATION_REDIS_URL = "redis://127.0.0.1:1/0"  # (nothing listens on port 1)
    with pytest.raises(CommandError, match="SIMULATION_REDIS_URL: Cannot be reached"):
        call_command("simulate", *SMALL)


def test_the_default_simulation_redis_is_database_10_of_redis_urls_server():
    from config.settings.base import _redis_db_url

    assert _redis_db_url("redis://127.0.0.1:6379", 10) == "redis://127.0.0.1:6379/10"  # (was redis://10)
    assert _redis_db_url("redis://:pw@cache:6380/0?socket_timeout=5", 10) == "redis://:pw@cache:6380/10?socket_timeout=5"
    assert _redis_db_url("redis://127.0.0.1:6379?db=2", 10) == "redis://127.0.0.1:6379/10"


def test_a_claim_that_lapsed_and_was_taken_is_neither_refreshed_nor_flushed(sim_redis):
    """Only the run holding the claim keeps it or empties the database: a run whose claim had
    lapsed flushed the database of the run that took it since."""
    mine = sandbox.Claim(settings.SIMULATION_REDIS_URL)
    mine.take()
    sim_redis.set(CLAIM_KEY, "another run")  # (lapsed, then taken)
    sim_redis.set("run:data", "theirs")
    with pytest.raises(Conflict, match="lapsed"):
        mine.refresh()
    mine.release()
    assert sim_redis.get(CLAIM_KEY) == "another run" and sim_redis.get("run:data") == "theirs"


def test_a_claim_is_kept_alive_by_its_heartbeat_while_the_run_sets_up(sim_redis, monkeypatch):
    """Refreshed only at each simulated minute, a 5,000-driver set-up used half the claim's
    time-to-live before the first."""
    monkeypatch.setattr(sandbox, "CLAIM_HEARTBEAT_SECONDS", 0.05)
    claim = sandbox.Claim(settings.SIMULATION_REDIS_URL)
    claim.take()
    try:
        sim_redis.expire(CLAIM_KEY, 5)
        deadline = time.monotonic() + 5
        while sim_redis.ttl(CLAIM_KEY) <= 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sim_redis.ttl(CLAIM_KEY) > 5
    finally:
        claim.release()
    assert sim_redis.dbsize() == 0


@pytest.mark.django_db(transaction=True)
def test_a_second_run_at_the_same_time_is_refused(sim_redis):
    sim_redis.set(CLAIM_KEY, "someone else", ex=60)
    with pytest.raises(CommandError, match="Another simulation is running"):
        call_command("simulate", *SMALL)
    assert sim_redis.get(CLAIM_KEY) == "someone else"


@pytest.mark.parametrize("args, message", [
    (["--policy", "fastest"], "Unknown policy 'fastest'"),
    (["--compare", "sequential,nope"], "Unknown policy 'nope'"),
    (["--compare", "batch,batch"], "listed twice"),
    (["--policy", "batch", "--compare", "batch,broadcast"], "not both"),
    (["--drivers", "0"], "drivers: Must be a number from 1 to 5000"),
    (["--orders-per-hour", "-5"], "orders_per_hour"),
    (["--minutes", "100000"], "minutes"),
    (["--city", "atlantis"], "Unknown city 'atlantis'"),
    (["--drivers", "many"], "invalid int value"),
    (["--json", "/nonexistent-dir/out.json"], "directory does not exist"),
    (["--json", "/tmp"], "/tmp: it is a directory"),  # (found only after the run, its figures lost)
    (["--policy", ""], "Unknown policy ''"),  # (ran the default: 1,000 drivers for an hour)
    (["--compare", ""], "Unknown policy ''"),
    (["--policy", "", "--compare", "batch,broadcast"], "not both"),
])
def test_bad_arguments_are_a_clear_command_error(args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        call_command("simulate", "--no-progress", *args)


def test_the_city_is_seeded_and_orders_are_poisson_near_the_stores():
    a, b, c = City(seed=7), City(seed=7), City(seed=8)
    assert a.orders(per_hour=600, seconds=3600) == b.orders(per_hour=600, seconds=3600)
    assert a.drivers(50) == b.drivers(50)
    assert a.orders(per_hour=600, seconds=3600) != c.orders(per_hour=600, seconds=3600)
    orders = City(seed=3).orders(per_hour=3000, seconds=3600)
    assert 2800 < len(orders) < 3200  # Poisson: 3000 ± 3.7σ
    busiest = max(a.stores, key=lambda s: s.popularity)
    share = sum(o.store is busiest for o in a.orders(per_hour=5000, seconds=3600)) / 5000
    assert share > 1.5 / len(a.stores)  # hotspots: the busiest store well above an even share


def test_percentile_is_nearest_rank():
    assert percentile([], 95) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile([3, 1, 2], 50) == 2


@pytest.mark.django_db(transaction=True)
def test_diverted_tasks_reach_the_sink_after_commit_and_not_on_rollback():
    seen = []
    with tasks_diverted(lambda name, args, options: seen.append((name, args, options))):
        with transaction.atomic():
            enqueue_task_on_commit("offers.expire_offer", "o1", eta="later")
            assert seen == []
        try:
            with transaction.atomic():
                enqueue_task_on_commit("offers.expire_offer", "o2")
                raise RuntimeError
        except RuntimeError:
            pass
    assert seen == [("offers.expire_offer", ("o1",), {"eta": "later"})]


def test_the_periodic_jobs_run_on_the_production_schedule():
    """The simulator runs the dispatch-related periodic tasks by name, at the intervals
    config/periodic.py installs; a task renamed or retimed there shows here."""
    from config.periodic import PERIODIC_TASKS as production
    from simulation.engine import PERIODIC_TASKS, registered_tasks

    schedule = {task: every for task, every, _options in production.values()}
    tasks = registered_tasks()
    for name, every in PERIODIC_TASKS.items():
        if name in schedule:
            assert schedule[name] == every, name
            assert name in tasks, name
        else:  # not on this code base (yet): the simulator skips it
            assert name not in tasks, name


def test_a_difference_inside_its_interval_is_within_noise():
    """The docs named a winner from 1-4 % differences that two runs of one policy also show."""
    base = [300.0, 320.0, 280.0, 310.0, 290.0] * 20
    assert difference(base, [x - 2 for x in base])["verdict"] == "within noise"  # -2 s: the interval is ±3.9 s here
    far = difference(base, [x - 40 for x in base])
    assert far["verdict"] == "lower" and far["difference"] == -40.0 and far["ci95"][1] < 0
    assert far["relative"] == round(-40 / 300, 4)
    assert difference(base, [x + 40 for x in base])["verdict"] == "higher"
    assert difference([1.0], [2.0, 3.0]) is None


def test_a_task_with_a_countdown_runs_then_and_an_unknown_one_is_dropped():
    """A dispatch's second look (a countdown, no eta) was dropped: the simulator left deliveries
    unassigned until the retry job where production looks again 0.2 s later."""
    from simulation.engine import Params, Simulation

    sim = Simulation(Params(drivers=1, orders_per_hour=1, minutes=1, seed=1, policy="sequential"))
    sim.now_s = 10.0
    sim._task("dispatch.second_look", ("d1", "t", None, []), {"countdown": 0.2})
    sim._task("no.such_task", (), {"countdown": 0.2})
    look = ("dispatch.second_look", ("d1", "t", None, []))
    assert [(t, kind, args) for t, _, kind, args in sim._heap] == [(10.2, "task", look)]
    assert sim.trace.tasks_dropped == {"no.such_task": 1}
