"""The discrete-event loop: the seeded city's orders and drivers acting on the platform's real
workflows, on a simulated clock (docs/dispatch.md, "The simulator").

Every platform action is the production code path, called with `now=` the simulated time,
under time-machine for whatever reads the clock itself:

- an order: `workflows.deliveries.delivery_create(auto_dispatch=True)`;
- the tasks the platform enqueues are taken from the queue (`common.broadcast.tasks_diverted`)
  and played as a worker would: the offer's push (`offers.push_offer`) is the driver hearing
  of the offer; a task with an eta (`offers.expire_offer`, a batched_matching round) runs at
  its eta, through the task registry; the rest (ETA refreshes, webhooks, alerts) is counted
  and dropped;
- a driver answers after its own delay with `workflows.offers.offer_accept` /
  `offer_reject`, or not at all;
- the steps (`delivery_advance`: pickup-started on arrival, pickup-completed and
  delivery-started on leaving, delivery-completed at the door), breaks
  (`availability_take_break`);
- location fixes as the fast lane records them (the live state in Redis, then
  `availability.services.positions_persist` into PostgreSQL, one statement a batch), every
  FIX_INTERVAL_S for moving drivers and at every stop, every IDLE_FIX_INTERVAL_S for waiting
  ones; the customer-tracking ETA refresh a fix may start is left out (it does not feed
  dispatch), like the live events to sockets (counted, not sent: no socket listens);
- the periodic jobs that touch dispatch, by task name at their production intervals
  (PERIODIC_TASKS: offer sweep, break expiry, matching sweep, unassigned retry, escalation
  check, stale drivers).

Nothing sleeps: the clock jumps from one event to the next.
"""
from __future__ import annotations

import heapq
import itertools
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone as dt_timezone

import time_machine
from celery import current_app
from django.contrib.auth import get_user_model
from django.contrib.gis.geos import Point
from django.db import connection, transaction
from django.db.models import Count

from availability import live
from availability.models import Driver, DriverAvailability
from availability.services import driver_create, positions_persist
from common.actors import Actor
from common.broadcast import events_diverted, tasks_diverted
from common.exceptions import Conflict, NotFound
from dispatch.services import DeliveryInput
from escalation.models import UnassignedOrder
from offers.models import RejectionReason
from simulation.city import City, DriverMind, Order
from tracking import eta
from workflows import deliveries, drivers as driver_workflows, offers as offer_workflows
from zones.demo import ensure_demo_zones
from zones.services import zone_update

logger = logging.getLogger(__name__)

START = datetime(2026, 1, 5, 11, 0, tzinfo=dt_timezone.utc)  # a Monday's lunch peak; never the wall clock
FIX_INTERVAL_S = 30
IDLE_FIX_INTERVAL_S = 120
SAMPLE_S = 60
# The run's tables start empty and fill fast: refresh the planner's statistics as autovacuum
# keeps them in a long-lived database (without, the screening query keeps the plans of empty
# tables: 13 ms by the middle of a peak run, bench/README.md).
ANALYZE_EVERY_S = 300
DRAIN_MAX_S = 30 * 60  # after the last order, run on until every order is finished, at most this long
# The periodic jobs that touch dispatch, by task name, every N seconds: the production schedule
# (config/periodic.py). A task this code base does not register is skipped.
PERIODIC_TASKS = {
    "offers.expire_overdue_offers": 5,
    "availability.expire_breaks": 10,
    "dispatch.run_matching_rounds": 15,
    "dispatch.retry_unassigned": 30,
    "escalation.check": 30,
    "availability.mark_stale_drivers_offline": 60,
}
PUSH_TASK = "offers.push_offer"


def registered_tasks() -> dict:
    """The Celery tasks by name, the apps' tasks modules loaded (as a worker has them)."""
    current_app.loader.import_default_modules()
    return dict(current_app.tasks)


@dataclass(frozen=True)
class Params:
    drivers: int
    orders_per_hour: float
    minutes: int
    seed: int
    policy: str
    stacking: bool = False
    city: str = "demo"

    def as_json(self) -> dict:
        return {"drivers": self.drivers, "ordersPerHour": self.orders_per_hour, "minutes": self.minutes,
                "seed": self.seed, "policy": self.policy, "stacking": self.stacking, "city": self.city}


@dataclass
class SimDriver:
    pk: str
    mind: DriverMind
    pos: tuple[float, float]
    actor: Actor
    jobs: dict[str, str] = field(default_factory=dict)  # delivery id → "assigned" | "carrying" (insertion order)
    leg: tuple[float, tuple, tuple, float] | None = None  # (start s, from, to, end s)
    last_fix_s: float = -1e9
    waiting: bool = False  # at a stop (handing over, collecting)

    def position(self, t: float) -> tuple[float, float]:
        if self.leg is None:
            return self.pos
        start, a, b, end = self.leg
        f = min(1.0, max(0.0, (t - start) / (end - start))) if end > start else 1.0
        return (a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f)


@dataclass
class Trace:
    """What the loop saw on the way (the rest is read from the database at the end)."""

    samples: list[dict] = field(default_factory=list)  # per minute: availability counts, unassigned
    offers_heard: int = 0
    answers: dict[str, int] = field(default_factory=lambda: {"accept": 0, "reject": 0, "ignore": 0})
    lost_races: int = 0
    steps_refused: int = 0
    tasks_dropped: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)  # live events by type (no socket listens)
    breaks: int = 0
    end_s: float = 0.0


class Simulation:
    def __init__(self, params: Params, *, progress=None):
        self.p = params
        self.city = City(seed=params.seed, name=params.city)
        self.orders = self.city.orders(per_hour=params.orders_per_hour, seconds=params.minutes * 60)
        self.traits = self.city.drivers(params.drivers)
        self.progress = progress  # progress(simulated seconds done, of total) — called outside the time travel
        self.trace = Trace()
        self._heap: list = []
        self._seq = itertools.count()
        self.now_s = 0.0
        self.drivers: dict[str, SimDriver] = {}
        self.order_of: dict[str, Order] = {}  # delivery id → order
        self.open: set[str] = set()  # delivery ids not finished yet
        self.delivery_ids: list[str] = []
        self.tasks = registered_tasks()

    # ---------------------------------------------------------------- clock
    def at(self, seconds: float) -> datetime:
        return START + timedelta(seconds=seconds)

    def schedule(self, t: float, kind: str, *args) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, args))

    # ---------------------------------------------------------------- set-up
    def _setup(self) -> None:
        now = self.at(0)
        for zone in ensure_demo_zones():
            zone_update(zone_id=zone.pk, dispatch_policy=self.p.policy, stacking_enabled=self.p.stacking)
        User = get_user_model()
        self.seller = User.objects.create_user(username="simulator-seller")
        self.seller_actor = Actor("integration", self.seller.pk)
        fixes = []
        for t in self.traits:
            driver, _token = driver_create(
                name=f"Sim driver {t.index + 1}", phone=f"+9170{t.index:08d}", vehicle="simulated",
                vehicle_type=t.vehicle_type, username=f"sim-driver-{t.index + 1}",
            )
            pk = str(driver.pk)
            self.drivers[pk] = SimDriver(pk=pk, mind=DriverMind(t), pos=(t.lat, t.lon), actor=Actor("driver", driver.pk))
            fixes.append(pk)
        self._record_fixes(fixes, 0.0, now)
        for pk in fixes:
            driver_workflows.availability_resume(driver_id=pk, actor=self.drivers[pk].actor, now=now)

    # ---------------------------------------------------------------- run
    def run(self) -> Trace:
        horizon = self.p.minutes * 60.0
        end = horizon + DRAIN_MAX_S
        with self._diverted(), time_machine.travel(self.at(0), tick=False):
            self._setup()
        for order in self.orders:
            self.schedule(order.at_s, "order", order)
        for name, every in PERIODIC_TASKS.items():
            if name in self.tasks:
                self.schedule(float(every), "periodic", name, every)
        self.schedule(float(FIX_INTERVAL_S), "fixes")
        self.schedule(0.0, "sample")
        self.schedule(float(ANALYZE_EVERY_S), "analyze")
        minute = 0
        while self._heap:
            # One simulated minute per time travel; progress in between, on the wall clock.
            until = (minute + 1) * SAMPLE_S
            with self._diverted(), time_machine.travel(self.at(minute * SAMPLE_S), tick=False) as traveller:
                while self._heap and self._heap[0][0] < until:
                    t, _seq, kind, args = heapq.heappop(self._heap)
                    self.now_s = t
                    traveller.move_to(self.at(t))
                    getattr(self, f"_on_{kind}")(t, *args)
            minute += 1
            done = until >= horizon and (not self.open or until >= end)
            if self.progress is not None:  # the drain counts as its longest; a run that drains sooner jumps to the end
                self.progress(end if done else min(until, end), end)
            if done:
                break
        self.trace.end_s = float(minute * SAMPLE_S)
        return self.trace

    # ---------------------------------------------------------------- tasks and events the platform sends
    @contextmanager
    def _diverted(self):
        with tasks_diverted(self._task), events_diverted(self._events):
            yield

    def _events(self, entries) -> None:
        for _groups, event in entries:
            kind = event.get("type", "?")
            self.trace.events[kind] = self.trace.events.get(kind, 0) + 1

    def _task(self, name: str, args: tuple, options: dict) -> None:
        """A task the platform enqueued. The offer's push: the driver hears of it. A task with
        an eta (the offer's expiry, a matching round) or a countdown (a dispatch's second look):
        a worker runs it then. Anything else (ETA refreshes, webhooks, alerts) is not part of
        the model (docs/dispatch.md)."""
        eta_at, countdown = options.get("eta"), options.get("countdown")
        if name == PUSH_TASK:
            # Heard once the current event is over (the push runs after commit, and the order's
            # delivery id is known to the loop only when delivery_create has returned).
            self.schedule(self.now_s, "heard", *args)
        elif isinstance(eta_at, datetime) and name in self.tasks:
            self.schedule(max((eta_at - START).total_seconds(), self.now_s), "task", name, args)
        elif isinstance(countdown, (int, float)) and name in self.tasks:
            self.schedule(self.now_s + countdown, "task", name, args)
        else:
            self.trace.tasks_dropped[name] = self.trace.tasks_dropped.get(name, 0) + 1

    def _on_heard(self, t: float, offer_id: str, driver_id: str, event: dict) -> None:
        """The driver's phone shows the offer: it decides from the pickup distance, and answers
        after its own delay (or never: the offer expires)."""
        self.trace.offers_heard += 1
        driver = self.drivers.get(driver_id)
        order = self.order_of.get(event.get("deliveryId", ""))
        if driver is None or order is None:
            return
        here = driver.position(self.now_s)
        decision, seconds = driver.mind.answer(eta.haversine_km(here[0], here[1], order.pickup[0], order.pickup[1]))
        self.trace.answers[decision] += 1
        if decision != "ignore":
            self.schedule(self.now_s + seconds, "answer", offer_id, driver_id, decision)

    # ---------------------------------------------------------------- events
    def _on_order(self, t: float, order: Order) -> None:
        now = self.at(t)
        data = DeliveryInput(
            seller_order_id=f"SIM-{order.index:06d}", store_name=f"Store {order.store.index}",
            pickup_location=Point(order.pickup[1], order.pickup[0], srid=4326),
            dropoff_location=Point(order.dropoff[1], order.dropoff[0], srid=4326),
        )
        delivery = deliveries.delivery_create(
            data=data, created_by=self.seller, actor=self.seller_actor, auto_dispatch=True, now=now,
        )
        pk = str(delivery.pk)
        self.order_of[pk] = order
        self.open.add(pk)
        self.delivery_ids.append(pk)

    def _on_answer(self, t: float, offer_id: str, driver_id: str, decision: str) -> None:
        driver = self.drivers[driver_id]
        now = self.at(t)
        try:
            if decision == "accept":
                result = offer_workflows.offer_accept(offer_id=offer_id, driver_id=driver_id, actor=driver.actor, now=now)
                self._assigned(t, driver, str(result.offer.delivery_id))
            else:
                offer_workflows.offer_reject(
                    offer_id=offer_id, driver_id=driver_id, reason=RejectionReason.TOO_FAR, actor=driver.actor, now=now
                )
        except (Conflict, NotFound):
            self.trace.lost_races += 1  # expired, withdrawn, or another driver's accept came first

    def _on_task(self, t: float, name: str, args: tuple) -> None:
        """A worker runs the task at its eta; the task reads the clock (time-machine: now is t)."""
        self.tasks[name].run(*args)

    def _on_periodic(self, t: float, name: str, every: int) -> None:
        self.tasks[name].run()
        self.schedule(t + every, "periodic", name, every)

    def _on_fixes(self, t: float) -> None:
        due = [
            d.pk for d in self.drivers.values()
            if d.leg is not None or t - d.last_fix_s >= IDLE_FIX_INTERVAL_S
        ]
        self._record_fixes(due, t, self.at(t))
        self.schedule(t + FIX_INTERVAL_S, "fixes")

    def _on_sample(self, t: float) -> None:
        counts = dict(Driver.objects.order_by().values_list("availability").annotate(n=Count("pk")))
        unassigned = UnassignedOrder.objects.filter(resolved_at__isnull=True).count()
        self.trace.samples.append({"t": t, "counts": {k: counts.get(k, 0) for k in DriverAvailability.values},
                                   "unassigned": unassigned, "open": len(self.open)})
        self.schedule(t + SAMPLE_S, "sample")

    def _on_analyze(self, t: float) -> None:
        with connection.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename")
            for (table,) in cur.fetchall():
                cur.execute(f'ANALYZE "{table}"')
        self.schedule(t + ANALYZE_EVERY_S, "analyze")

    # ---------------------------------------------------------------- a driver's trip
    def _assigned(self, t: float, driver: SimDriver, delivery_id: str) -> None:
        driver.jobs[delivery_id] = "assigned"
        if driver.leg is None and not driver.waiting:
            self._next_leg(t, driver)

    def _next_leg(self, t: float, driver: SimDriver) -> None:
        here = driver.position(t)
        driver.pos, driver.leg = here, None
        to_pick = [d for d, phase in driver.jobs.items() if phase == "assigned"]
        to_drop = [d for d, phase in driver.jobs.items() if phase == "carrying"]
        if to_pick:
            target = min(to_pick, key=lambda d: (eta.haversine_km(*here, *self.order_of[d].pickup), d))
            kind, point = "at_pickup", self.order_of[target].pickup
        elif to_drop:
            target = min(to_drop, key=lambda d: (eta.haversine_km(*here, *self.order_of[d].dropoff), d))
            kind, point = "at_dropoff", self.order_of[target].dropoff
        else:
            return
        arrive = t + driver.mind.travel_seconds(here, point)
        driver.leg = (t, here, point, arrive)
        self.schedule(arrive, kind, driver.pk, target)

    def _step(self, t: float, driver: SimDriver, delivery_id: str, step: str) -> bool:
        try:
            deliveries.delivery_advance(delivery_id=delivery_id, driver_id=driver.pk, step=step, actor=driver.actor, now=self.at(t))
            return True
        except (Conflict, NotFound):  # cancelled or reassigned meanwhile (ops, escalation)
            logger.info("simulated driver %s: %s of delivery %s refused", driver.pk, step, delivery_id, exc_info=True)
            self.trace.steps_refused += 1
            driver.jobs.pop(delivery_id, None)
            return False

    def _arrive(self, t: float, driver: SimDriver) -> None:
        driver.pos, driver.leg = driver.leg[2], None
        driver.waiting = True
        self._record_fixes([driver.pk], t, self.at(t))

    def _on_at_pickup(self, t: float, driver_id: str, delivery_id: str) -> None:
        """At the store: every order of this driver waiting here is collected in one stop."""
        driver = self.drivers[driver_id]
        self._arrive(t, driver)
        here = driver.pos
        batch = [
            d for d, phase in driver.jobs.items()
            if phase == "assigned" and (d == delivery_id or eta.haversine_km(*here, *self.order_of[d].pickup) < 0.05)
        ]
        started = [d for d in batch if self._step(t, driver, d, "pickup-started")]
        if started:
            self.schedule(t + driver.mind.handover_seconds(), "leave_pickup", driver_id, tuple(started))
        else:
            driver.waiting = False
            self._next_leg(t, driver)

    def _on_leave_pickup(self, t: float, driver_id: str, delivery_ids: tuple[str, ...]) -> None:
        driver = self.drivers[driver_id]
        for delivery_id in delivery_ids:
            if delivery_id in driver.jobs and self._step(t, driver, delivery_id, "pickup-completed"):
                if self._step(t, driver, delivery_id, "delivery-started"):
                    driver.jobs[delivery_id] = "carrying"
        driver.waiting = False
        self._next_leg(t, driver)

    def _on_at_dropoff(self, t: float, driver_id: str, delivery_id: str) -> None:
        driver = self.drivers[driver_id]
        self._arrive(t, driver)
        self.schedule(t + driver.mind.dropoff_seconds(), "handed_over", driver_id, delivery_id)

    def _on_handed_over(self, t: float, driver_id: str, delivery_id: str) -> None:
        driver = self.drivers[driver_id]
        if delivery_id in driver.jobs and self._step(t, driver, delivery_id, "delivery-completed"):
            driver.jobs.pop(delivery_id)
            self.open.discard(delivery_id)
        driver.waiting = False
        if driver.jobs:
            self._next_leg(t, driver)
            return
        minutes = driver.mind.break_minutes()
        if minutes:
            try:
                driver_workflows.availability_take_break(
                    driver_id=driver.pk, duration_minutes=minutes, reason="simulated break", actor=driver.actor, now=self.at(t)
                )
                self.trace.breaks += 1
            except Conflict:
                pass  # got busy again in the same instant (stacking): no break

    # ---------------------------------------------------------------- fixes
    def _record_fixes(self, driver_ids: list[str], t: float, now: datetime) -> None:
        """The fixes as the fast lane records them: the live state in Redis (position, GEO
        index of the available), then PostgreSQL in one statement (what `consume_fixes` does,
        less the customer-tracking ETA refresh, which does not feed dispatch)."""
        if not driver_ids:
            return
        epoch = now.timestamp()
        fixes = []
        for pk in driver_ids:
            d = self.drivers[pk]
            lat, lon = d.position(t)
            d.last_fix_s = t
            fixes.append(live.Fix(driver_id=pk, lat=lat, lon=lon, recorded_at=epoch, accuracy_m=10.0))
        live.fixes_record_persisted(fixes)
        with transaction.atomic():
            positions_persist(fixes, now=now)
