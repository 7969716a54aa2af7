"""A web process (config.asgi) collects its youngest generation every GC_YOUNG_THRESHOLD
allocations, with its start-up objects frozen out of the collector (bench/README.md: with
CPython's defaults, 5,000 open sockets made 0.5-1 s full collections frequent)."""
import gc
import subprocess
import sys


def test_the_asgi_entry_point_sets_the_young_threshold_and_freezes_start_up_objects():
    code = (
        "import gc, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'config.settings.base';"
        "before = gc.get_threshold();"
        "import config.asgi;"
        "print(before[0], gc.get_threshold()[0], gc.get_freeze_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "GC_YOUNG_THRESHOLD": "12345"})
    assert out.returncode == 0, out.stderr
    before, after, frozen = map(int, out.stdout.split())
    assert before == 700 and after == 12345
    assert frozen > 10_000  # Django and the apps, at least
    assert gc.isenabled()
