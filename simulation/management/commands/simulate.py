"""`manage.py simulate`: run the dispatch simulator (docs/dispatch.md, "The simulator")."""
import json
import os
import time

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from common.exceptions import Conflict, InvalidInput
from simulation import services
from simulation.engine import Params


class Command(BaseCommand):
    help = "Simulate a city on the real dispatch services (own database and Redis) and report the figures."

    def add_arguments(self, parser):
        parser.add_argument("--drivers", type=int, default=1000)
        parser.add_argument("--orders-per-hour", type=int, default=5000)
        parser.add_argument("--minutes", type=int, default=60, help="minutes of order arrivals (simulated)")
        parser.add_argument("--seed", type=int, default=7)
        parser.add_argument("--policy", default=None, help="sequential | batch | broadcast | batched_matching")
        parser.add_argument("--stacking", action="store_true", help="order stacking on in every zone")
        parser.add_argument("--city", default="demo")
        parser.add_argument("--compare", default=None,
                            help="several policies side by side, comma-separated (a policy+stacking is allowed)")
        parser.add_argument("--json", dest="json_path", default=None, help="write the JSON result here")
        parser.add_argument("--report", dest="report_path", default=None, help="write the HTML report here")
        parser.add_argument("--series", dest="series_path", default=None,
                            help="write the report's series here (JSON), for `simulate_report` to put runs made apart side by side")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **o):
        if o["policy"] is not None and o["compare"] is not None:
            raise CommandError("Give --policy or --compare, not both.")
        # (an empty --policy or --compare is refused as an unknown policy: it ran the default,
        # 1,000 drivers for an hour)
        policies = [p.strip() for p in o["compare"].split(",")] if o["compare"] is not None else [
            "sequential" if o["policy"] is None else o["policy"].strip()]
        _writable(o["json_path"], o["report_path"], o["series_path"])
        base = Params(drivers=o["drivers"], orders_per_hour=o["orders_per_hour"], minutes=o["minutes"], seed=o["seed"],
                      policy=policies[0], stacking=o["stacking"], city=o["city"])
        try:
            services.validate(drivers=base.drivers, orders_per_hour=base.orders_per_hour, minutes=base.minutes,
                              seed=base.seed, policies=policies, city=base.city)
        except InvalidInput as e:
            raise CommandError(_message(e)) from None

        bar = None if o["no_progress"] else tqdm(total=100, unit="%", desc="simulating", file=self.stderr._out)

        def progress(fraction: float, name: str) -> None:
            if bar is not None:
                bar.set_description(name)
                bar.update(round(fraction * 100) - bar.n)

        started = time.perf_counter()
        try:
            outcome = services.run(base, policies, progress=progress)
        except (InvalidInput, Conflict) as e:
            raise CommandError(_message(e)) from None
        finally:
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - started
        text = json.dumps(outcome.json, indent=2, sort_keys=True)
        if o["json_path"]:
            with open(o["json_path"], "w") as f:
                f.write(text + "\n")
        else:
            self.stdout.write(text)
        if o["report_path"]:
            with open(o["report_path"], "w") as f:
                f.write(services.render_report(outcome))
        if o["series_path"]:
            with open(o["series_path"], "w") as f:
                json.dump(outcome.series, f)
        self.stderr.write(f"done in {elapsed:.1f} s (wall clock)")


def _writable(*paths) -> None:
    """CommandError for an output path that cannot be written, before the run (after it, its
    figures were lost with a traceback)."""
    for path in paths:
        if not path:
            continue
        if os.path.isdir(path):
            raise CommandError(f"Cannot write {path}: it is a directory.")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise CommandError(f"Cannot write {path}: its directory does not exist.")


def _message(error) -> str:
    details = getattr(error, "details", None) or {}
    if isinstance(details, dict) and details:
        return "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in details.items())
    return str(error)
