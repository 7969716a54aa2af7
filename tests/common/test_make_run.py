"""`make run PORT=…`: the customers' tracking links it hands out point at the server it starts
(they pointed at port 8000 whatever PORT was, so a demo on another port sent dead links)."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_command(**env) -> str:
    """TRACKING_BASE_URL as the shell line `make run` starts the processes with sets it (make -n
    prints the line and runs nothing; the line is then run with printenv for supervisord).
    `env`: variables to set, or None to unset."""
    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    out = subprocess.run(["make", "-n", "run", "PORT=8311"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.replace("\\\n", " ").splitlines() if "exec supervisord" in line)
    return subprocess.run(["sh", "-c", line.replace("exec supervisord", "printenv TRACKING_BASE_URL #")],
                          env=env, capture_output=True, text=True, timeout=60).stdout.strip()


def test_make_run_gives_tracking_links_of_its_own_port_unless_told_otherwise():
    assert _run_command(TRACKING_BASE_URL=None) == "http://127.0.0.1:8311/track"
    assert _run_command(TRACKING_BASE_URL="https://track.example.com/t") == "https://track.example.com/t"


def test_make_run_and_compose_run_a_worker_for_the_timers_queue_alone():
    """Work due at a moment (queue `timers`: offer expiry, the retry, stale-driver and escalation
    jobs) has a worker no long outbound call can take: under `make run` a webhook sweep held the
    one worker's slots for 30-50 s a run and the jobs ran minutes late."""
    import configparser

    import yaml

    conf = configparser.RawConfigParser(strict=False)
    conf.read(ROOT / "deploy" / "supervisord.conf")
    commands = [conf.get(section, "command") for section in conf.sections() if section.startswith("program:")]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for found in (commands, [str(service.get("command", "")) for service in compose.values()]):
        timers_only = [c for c in found if "worker" in c and " -Q timers " in f"{c} " and "--concurrency 1" in c]
        assert len(timers_only) == 1, found


def _worker_queues() -> dict[str, list[set[str]]]:
    """The queues of each Celery worker, as `make run`, the local cluster and docker-compose start them."""
    import configparser
    import re

    import yaml

    found = {}
    for name, path in (("make run", ROOT / "deploy" / "supervisord.conf"),
                       ("cluster", ROOT / "deploy" / "cluster" / "supervisord.conf")):
        conf = configparser.RawConfigParser(strict=False)
        conf.read(path)
        found[name] = [conf.get(section, "command") for section in conf.sections() if section.startswith("program:")]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    found["compose"] = [str(service.get("command", "")) for service in compose.values()]
    return {
        name: [set(re.search(r" -Q (\S+)", c).group(1).split(",")) for c in commands if " worker " in f" {c} "]
        for name, commands in found.items()
    }


def test_the_webhook_sweep_has_a_worker_of_its_own_and_every_routed_queue_a_worker():
    """The webhook sweep waits on the sellers' endpoints for up to its budget: on the general
    worker it held one of two processes 30 s at a time, and the ETA refreshes and customer
    messages waited behind it. Its queue has one worker, which takes nothing else. And a queue
    tasks are routed to with no worker would never run them."""
    from django.conf import settings

    routed = {"celery"} | {route["queue"] for route in settings.CELERY_TASK_ROUTES.values()}
    assert settings.CELERY_TASK_ROUTES["notifications.deliver_webhooks"] == {"queue": "webhooks"}
    for name, workers in _worker_queues().items():
        assert [queues for queues in workers if "webhooks" in queues] == [{"webhooks"}], name
        # (the local cluster runs no simulations)
        assert routed - (set() if name != "cluster" else {"simulation"}) <= set().union(*workers), name


def test_compose_workers_keep_the_node_name_their_healthcheck_looks_for():
    """`manage.py healthcheck worker` looks for `celery@<hostname>`: a compose worker named
    with `-n timers@%h` never passed it."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    workers = {name: str(s.get("command", "")) for name, s in compose.items() if " worker " in f" {s.get('command', '')} "}
    assert len(workers) >= 4 and not [name for name, command in workers.items() if " -n " in f" {command} "], workers
