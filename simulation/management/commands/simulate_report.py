"""`manage.py simulate_report`: put runs made apart side by side in one report
(docs/dispatch.md, "The simulator")."""
import json

from django.core.management.base import BaseCommand, CommandError

from common.exceptions import InvalidInput
from simulation import services
from simulation.management.commands.simulate import _message, _writable


class Command(BaseCommand):
    help = "One side-by-side report (and JSON) from runs of `simulate --json … --series …` on the same city, seed and load."

    def add_arguments(self, parser):
        parser.add_argument("--run", nargs=2, action="append", metavar=("JSON", "SERIES"), required=True,
                            help="a run's (or a comparison's) JSON and series files; give --run once per run")
        parser.add_argument("--report", dest="report_path", required=True, help="write the HTML report here")
        parser.add_argument("--json", dest="json_path", default=None, help="write the merged JSON here")

    def handle(self, *args, **o):
        _writable(o["report_path"], o["json_path"])
        parts = []
        for json_path, series_path in o["run"]:
            try:
                with open(json_path) as f, open(series_path) as g:
                    parts.append((json.load(f), json.load(g)))
            except (OSError, ValueError) as e:
                raise CommandError(f"Cannot read {json_path} / {series_path}: {e}") from None
        try:
            outcome = services.outcome_merge(parts)
        except InvalidInput as e:
            raise CommandError(_message(e)) from None
        except (KeyError, TypeError, AttributeError):
            raise CommandError("These files were not written by `simulate --json … --series …`.") from None
        with open(o["report_path"], "w") as f:
            f.write(services.render_report(outcome))
        if o["json_path"]:
            with open(o["json_path"], "w") as f:
                f.write(json.dumps(outcome.json, indent=2, sort_keys=True) + "\n")
        self.stderr.write(f"{len(outcome.json['runs'])} runs side by side: {', '.join(outcome.json['runs'])}")
