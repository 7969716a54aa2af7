"""Running simulations: one policy, or several side by side on the same seeded city."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from common.exceptions import InvalidInput
from dispatch.models import DispatchPolicy
from simulation.city import CITIES
from simulation.engine import Params, Simulation
from simulation.metrics import collect, comparison
from simulation.models import SimulationRun, SimulationStatus
from simulation.sandbox import control_connection, sandbox

logger = logging.getLogger(__name__)

LIMITS = {"drivers": (1, 5000), "orders_per_hour": (1, 50000), "minutes": (1, 240), "seed": (0, 2**31 - 1)}

# progress(fraction done 0..1, label)
Progress = Callable[[float, str], None]


@dataclass
class Outcome:
    json: dict
    series: dict  # policy label → series for the report


STACKING_SUFFIX = "+stacking"


def label(policy: str, stacking: bool) -> str:
    return f"{policy}{STACKING_SUFFIX}" if stacking else policy


def variants(policies: list[str], *, stacking: bool) -> list[tuple[str, bool]]:
    """"batch" or "batch+stacking" → (policy, stacking); `stacking` (the --stacking flag) turns
    it on for all."""
    out = []
    for name in policies:
        policy = name.removesuffix(STACKING_SUFFIX)
        out.append((policy, stacking or policy != name))
    return out


# A worker's wall-clock seconds per simulated order and policy to plan with: 0.07 s of CPU an
# order at the peak run, 0.15 s of wall clock on a shared 2-core box (bench/README.md).
SECONDS_PER_ORDER = 0.2
# ... for a city that can serve its orders: past this many orders an hour per driver the backlog
# of unassigned orders (each retried and escalated) makes a simulated minute cost minutes.
MAX_ORDERS_PER_DRIVER_HOUR = 20


def orders_in(*, orders_per_hour, minutes, policies: list[str]) -> int:
    """The orders a run simulates, all policies together."""
    return round(orders_per_hour * minutes / 60) * len(policies)


def task_orders_limit() -> int:
    """The most orders (all policies together) a run started from the admin may simulate: what
    fits in the simulation worker's time limit (SIMULATION_TASK_TIME_LIMIT)."""
    return int(settings.SIMULATION_TASK_TIME_LIMIT / SECONDS_PER_ORDER)


def validate(*, drivers, orders_per_hour, minutes, seed, policies: list[str], city: str) -> None:
    """InvalidInput (field → messages) for anything out of range."""
    errors: dict[str, list[str]] = {}
    for name, value in (("drivers", drivers), ("orders_per_hour", orders_per_hour), ("minutes", minutes), ("seed", seed)):
        lo, hi = LIMITS[name]
        if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
            errors[name] = [f"Must be a number from {lo} to {hi}."]
    known = list(DispatchPolicy.values)
    if not policies:
        errors["policy"] = ["Give at least one policy."]
    for p in policies:
        if p.removesuffix(STACKING_SUFFIX) not in known:
            errors.setdefault("policy", []).append(f"Unknown policy {p!r}; one of {', '.join(known)}.")
    if len(set(policies)) != len(policies):
        errors.setdefault("policy", []).append("A policy is listed twice.")
    if city not in CITIES:
        errors["city"] = [f"Unknown city {city!r}; one of {', '.join(CITIES)}."]
    if errors:
        raise InvalidInput(errors)


def simulate(params: Params, *, progress: Progress | None = None) -> tuple[dict, dict]:
    """One run in its own sandbox: (JSON result, report series)."""
    overrides = {"DISPATCH_POLICY": params.policy, "STACKING_ENABLED": params.stacking}
    with sandbox(seed=params.seed, settings_overrides=overrides) as claim:

        def tick(done: float, total: float) -> None:
            claim.refresh()
            if progress is not None:
                progress(done / total if total else 1.0, label(params.policy, params.stacking))

        # The simulated city's own INFO lines (a log line per matching round, per refused step:
        # tens of thousands at peak) say nothing about the platform: warnings and errors only.
        previous = logging.root.manager.disable
        logging.disable(logging.INFO)
        try:
            trace = Simulation(params, progress=tick).run()
        finally:
            logging.disable(previous)
        return collect(params, trace)


def run(base: Params, policies: list[str], *, progress: Progress | None = None) -> Outcome:
    """Each policy ("batch", or "batch+stacking") on the same city, seed and load; one JSON
    (flat for one policy, `runs` keyed by policy for several) and the series for the report."""
    validate(drivers=base.drivers, orders_per_hour=base.orders_per_hour, minutes=base.minutes, seed=base.seed,
             policies=policies, city=base.city)
    todo = variants(policies, stacking=base.stacking)
    if len(set(todo)) != len(todo):
        raise InvalidInput({"policy": ["A policy is listed twice."]})
    results, series = {}, {}
    for i, (policy, stacking) in enumerate(todo):
        params = replace(base, policy=policy, stacking=stacking)

        def part(fraction: float, name: str, i=i) -> None:
            if progress is not None:
                progress((i + fraction) / len(todo), name)

        result, s = simulate(params, progress=part)
        results[label(policy, stacking)] = result
        series[label(policy, stacking)] = s
    if len(policies) == 1:
        return Outcome(json=next(iter(results.values())), series=series)
    parameters = {k: v for k, v in base.as_json().items() if k not in ("policy", "stacking")}
    return Outcome(
        json={"parameters": {**parameters, "policies": [label(p, st) for p, st in todo]}, "seed": base.seed, "runs": results,
              "comparison": comparison(series)},
        series=series,
    )


_PARAMETER_ORDER = ("drivers", "ordersPerHour", "minutes", "seed", "policy", "stacking", "city")


def outcome_merge(parts: list[tuple[dict, dict]]) -> Outcome:
    """One side-by-side outcome from runs made apart (`simulate --json … --series …`, e.g. two
    processes at once): each part is (the JSON of a run or of a comparison, its series). They
    must share the city, seed and load (only the policy differs), or the comparison means
    nothing; a policy may appear once."""
    runs, series = {}, {}
    base = settings_seen = None
    for result, part_series in parts:
        part_runs = result["runs"] if "runs" in result else {label(result["policy"], result["stacking"]): result}
        # in the order the comparison ran them (its first the baseline): a JSON file written
        # with sorted keys lists `runs` alphabetically, and the merge made another the baseline
        order = [p for p in (result.get("parameters") or {}).get("policies", []) if p in part_runs]
        part_runs = {name: part_runs[name] for name in order + [n for n in part_runs if n not in order]}
        for name, run in part_runs.items():
            # in `Params.as_json` order, as a run writes them (a JSON file may have sorted them)
            given = run["parameters"]
            run = {**run, "parameters": {k: given[k] for k in _PARAMETER_ORDER if k in given}
                   | {k: v for k, v in given.items() if k not in _PARAMETER_ORDER}}
            parameters = {k: v for k, v in run["parameters"].items() if k not in ("policy", "stacking")}
            if base is None:
                base = parameters
            elif parameters != base:
                raise InvalidInput({"runs": [f"{name} ran on {parameters}, not {base}: only the policy may differ."]})
            if name in runs:
                raise InvalidInput({"runs": [f"{name} is given twice."]})
            if name not in part_series:
                raise InvalidInput({"runs": [f"The series of {name} are missing."]})
            made = part_series[name].get("parameters")  # (series written before 2026-12-07 do not say)
            if made is not None and {k: made.get(k) for k in given} != given:
                raise InvalidInput({"runs": [f"The series given for {name} are of another run ({made})."]})
            ran_with = run.get("platformSettings")
            if ran_with is not None:
                if settings_seen is None:
                    settings_seen = ran_with
                elif ran_with != settings_seen:
                    changed = sorted(k for k in set(ran_with) | set(settings_seen) if ran_with.get(k) != settings_seen.get(k))
                    raise InvalidInput({"runs": [f"{name} ran with other settings ({', '.join(changed)}): only the policy may differ."]})
            runs[name], series[name] = run, part_series[name]
    if not runs:
        raise InvalidInput({"runs": ["No run given."]})
    return Outcome(
        json={"parameters": {**base, "policies": list(runs)}, "seed": base["seed"], "runs": runs,
              "comparison": comparison(series)},
        series=series,
    )


def render_report(outcome: Outcome) -> str:
    runs = outcome.json["runs"] if "runs" in outcome.json else {label(outcome.json["policy"], outcome.json["stacking"]): outcome.json}
    from simulation import report as report_module  # matplotlib: loaded by a run, not by every web process

    return report_module.render(runs, outcome.series, outcome.json.get("comparison"))


# ------------------------------------------------------------------------------ admin runs


def run_create(*, parameters: dict, user) -> SimulationRun:
    """A queued run (validated); the caller enqueues `simulation.run` after commit."""
    validate(drivers=parameters.get("drivers"), orders_per_hour=parameters.get("ordersPerHour"),
             minutes=parameters.get("minutes"), seed=parameters.get("seed"), policies=list(parameters.get("policies") or []),
             city=parameters.get("city", "demo"))
    return SimulationRun.objects.create(parameters=parameters, created_by=user)


# A running run writes its heartbeat with its progress: with each percent, and every this many
# seconds when the percent stands still (not while it sets up its sandbox, a few minutes at the
# largest runs); one silent for
# RUN_LOST_AFTER_SECONDS lost its worker (restarted, out of memory, killed at its time limit)
# and is failed: it showed "running" for ever.
HEARTBEAT_SECONDS = 60
RUN_LOST_AFTER_SECONDS = 15 * 60


def runs_lost_fail(*, using: str = "default", now=None) -> int:
    """Fail the running runs whose worker stopped (no heartbeat for RUN_LOST_AFTER_SECONDS).
    Run before a run starts and when the admin lists or shows runs."""
    now = now or timezone.now()
    silent_since = now - timedelta(seconds=RUN_LOST_AFTER_SECONDS)
    return SimulationRun.objects.using(using).filter(
        Q(heartbeat_at__lt=silent_since) | Q(heartbeat_at__isnull=True, started_at__lt=silent_since),
        status=SimulationStatus.RUNNING,
    ).update(status=SimulationStatus.FAILED, finished_at=now,
             error=f"Stopped without finishing: no sign of it for {RUN_LOST_AFTER_SECONDS // 60} minutes (its worker was "
                   "restarted, ran out of memory or reached its time limit). Start it again.")


class _RunDeleted(Exception):
    """The run's row is gone (deleted in the admin): the run stops at its next progress step."""


def run_execute(run_id: int) -> str:
    """Run a queued SimulationRun to its end (the Celery task): progress while it runs, then
    the JSON result and the report, or the error. Returns the final status."""
    with control_connection() as control:
        runs = SimulationRun.objects.using(control)
        runs_lost_fail(using=control)
        claimed = runs.filter(pk=run_id, status=SimulationStatus.QUEUED).update(
            status=SimulationStatus.RUNNING, started_at=timezone.now(), heartbeat_at=timezone.now(), progress=0
        )
        if not claimed:
            return runs.get(pk=run_id).status if runs.filter(pk=run_id).exists() else "missing"
        p = runs.get(pk=run_id).parameters
        base = Params(drivers=p["drivers"], orders_per_hour=p["ordersPerHour"], minutes=p["minutes"], seed=p["seed"],
                      policy=p["policies"][0], stacking=bool(p.get("stacking")), city=p.get("city", "demo"))
        last = {"progress": -1, "stage": "", "beat": time.monotonic()}

        def progress(fraction: float, stage: str) -> None:
            percent = min(99, int(fraction * 100))
            if (percent, stage) != (last["progress"], last["stage"]) or time.monotonic() - last["beat"] >= HEARTBEAT_SECONDS:
                last.update(progress=percent, stage=stage, beat=time.monotonic())
                if not runs.filter(pk=run_id, status=SimulationStatus.RUNNING).update(
                    progress=percent, stage=stage[:60], heartbeat_at=timezone.now()
                ):
                    raise _RunDeleted()  # deleted in the admin (or failed as lost) while it ran: stop, free the worker

        started = time.perf_counter()
        try:
            outcome = run(base, list(p["policies"]), progress=progress)
            report = render_report(outcome)
        except _RunDeleted:
            logger.info("simulation run %s was deleted while it ran: stopped", run_id)
            return "deleted"
        except Exception as e:  # recorded for ops to read; the worker log has the traceback
            logger.exception("simulation run %s failed", run_id)
            runs.filter(pk=run_id, status=SimulationStatus.RUNNING).update(status=SimulationStatus.FAILED, error=f"{type(e).__name__}: {e}"[:5000],
                                          finished_at=timezone.now(), runtime_seconds=time.perf_counter() - started)
            return SimulationStatus.FAILED
        runs.filter(pk=run_id, status=SimulationStatus.RUNNING).update(
            status=SimulationStatus.DONE, progress=100, stage="", result=outcome.json, report_html=report,
            finished_at=timezone.now(), runtime_seconds=time.perf_counter() - started,
        )
        return SimulationStatus.DONE
