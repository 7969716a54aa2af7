"""Shared by the benches: the machine's state, CPU per process group from /proc, wrk (installed
on demand, run with bench/location.lua), the /health/ yardstick, and a server (uvicorn + one
`manage.py consume_fixes`) started on a free loopback port and stopped afterwards.

Standard library only, so every bench can import it before Django or httpx.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
LUA = BENCH / "location.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NPROC = os.cpu_count() or 1

# Bench traffic sits at random spots far from the demo city, outside every delivery zone, so
# that dispatch never mixes it with anyone else's: the intake's serviceability rule would
# refuse it. Servers the benches start inherit this; a server given with --base must have it.
os.environ.setdefault("SERVICEABILITY_REQUIRE_ZONE", "false")


def refuse_non_loopback(base: str) -> None:
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        sys.exit(f"--base must be an http(s) URL, got {base!r}")
    host = parts.hostname
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    sys.exit(f"refusing to load-test {host!r}: only loopback targets (127.0.0.0/8, ::1, localhost) are allowed")


# ---------------------------------------------------------------------------- /proc


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def proc_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def with_descendants(roots) -> list[int]:
    pids = set(roots)
    parents = {p: ppid(p) for p in all_pids()}
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if pid not in pids and parent in pids:
                pids.add(pid)
                changed = True
    return sorted(pids)


def uvicorn_pids(port: int) -> list[int]:
    """The uvicorn process serving `port` (`--port N` on its command line) and its workers."""
    roots = []
    for pid in all_pids():
        args = cmdline(pid)
        if any("uvicorn" in a for a in args) and (
            ("--port" in args and args[args.index("--port") + 1:][:1] == [str(port)]) or f"--port={port}" in args
        ):
            roots.append(pid)
    return with_descendants(roots)


def machine_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_split() -> list[int]:
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:9]]


def label(pid: int) -> str:
    args = cmdline(pid)
    text = " ".join(args) if args else comm(pid)
    if "consume_fixes" in text:
        return "consume_fixes"
    if "celery" in text:
        return "celery " + ("beat" if " beat" in text else "worker")
    if "uvicorn" in text or "daphne" in text:
        return "uvicorn" + (f" :{args[args.index('--port') + 1]}" if "--port" in args[:-1] else "")
    if "pytest" in text:
        return "pytest"
    c = comm(pid)
    pg = pg_group(pid)
    if pg:
        return pg
    if c == "redis-server":
        return "redis"
    if c == "wrk":
        return "wrk"
    if "bench/" in text:
        return "bench " + Path(next((a for a in args if "bench/" in a), c)).name
    if "python" in c:
        return "python " + " ".join(a for a in args[1:3])[:60]
    return c


def pg_group(pid: int) -> str | None:
    """postgres <db> for a backend, `postgres (aux)` for the server's own processes."""
    if comm(pid) not in ("postgres", "postmaster") and not comm(pid).startswith("postgres"):
        return None
    args = cmdline(pid)
    text = args[0] if len(args) == 1 else " ".join(args)
    if ": " in text:
        rest = text.split(": ", 2)[-1].split()
        if len(rest) >= 3 and "(" in rest[2]:  # user db host(port) state
            return f"postgres {rest[1]}"
    return "postgres (aux)"


class CpuMeter:
    """CPU per group of processes between two snapshots, in % of one core. Every process's
    ticks are read at both snapshots and each is put in a group at the end (so a process that
    started in the window counts whole: PostgreSQL backends, wrk). `named` maps a group name to
    pids (and their descendants at the end); the rest are grouped by `label` (postgres by
    database, redis, pytest, …); `machine` is % of all cores, `unaccounted` what the machine
    spent beyond the listed groups (exited processes, the kernel, softirq)."""

    def __init__(self, named: dict[str, list[int]] | None = None, min_pct: float = 3.0):
        self.named = {k: list(v) for k, v in (named or {}).items()}
        self.min_pct = min_pct

    def add(self, name: str, pids: list[int]) -> None:
        self.named.setdefault(name, []).extend(pids)

    def snapshot(self) -> dict:
        return {"_pids": {p: proc_ticks(p) for p in all_pids()}, "_machine": machine_ticks(), "_split": cpu_split(),
                "_t": time.perf_counter()}

    @staticmethod
    def split(before: dict, after: dict) -> str:
        """The machine's time by kind (% of all cores): where 'unaccounted' often is (softirq:
        loopback TCP, steal: the host)."""
        d = [a - b for a, b in zip(after["_split"], before["_split"])]
        total = sum(d) or 1
        return " ".join(f"{name} {v / total * 100:.0f}%" for name, v in zip(CPU_FIELDS, d) if name != "idle" and v)

    def group_of(self, pid: int, named: dict[int, str]) -> str:
        if pid in named:
            return named[pid]
        g = pg_group(pid)
        if g:
            return g
        return label(pid) or "(exited)"

    def report(self, before: dict, after: dict, extra_cpu_s: dict[str, float] | None = None) -> dict[str, float]:
        """`extra_cpu_s`: CPU seconds of processes that ended in the window (wrk, from rusage)."""
        elapsed = after["_t"] - before["_t"]
        named = {}
        for name, pids in self.named.items():
            for p in with_descendants(pids):
                named.setdefault(p, name)
        groups: dict[str, float] = {name: 0.0 for name in self.named}
        for pid, ticks in after["_pids"].items():
            d = ticks - before["_pids"].get(pid, 0)
            if d > 0:
                g = self.group_of(pid, named)
                groups[g] = groups.get(g, 0.0) + d / CLK_TCK / elapsed * 100
        for name, cpu_s in (extra_cpu_s or {}).items():
            groups[name] = groups.get(name, 0.0) + cpu_s / elapsed * 100
        busy = after["_machine"][0] - before["_machine"][0]
        total = after["_machine"][1] - before["_machine"][1]
        machine_cores = busy / total * NPROC * 100 if total else float("nan")
        out = {k: v for k, v in sorted(groups.items(), key=lambda kv: -kv[1]) if k in self.named or v >= self.min_pct}
        small = sum(v for k, v in groups.items() if k not in out)
        if small:
            out["small ones"] = small
        out["unaccounted"] = max(0.0, machine_cores - sum(groups.values()))
        out["machine (all cores)"] = busy / total * 100 if total else float("nan")
        return out


def format_cpu(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())


def busiest(seconds: float = 1.0, top: int = 8) -> list[tuple[str, int, float]]:
    """(label, pid, % of one core) of the busiest processes over `seconds`."""
    pids = all_pids()
    before = {p: proc_ticks(p) for p in pids}
    time.sleep(seconds)
    rows = []
    for p in pids:
        d = proc_ticks(p) - before[p]
        if d > 0:
            rows.append((label(p), p, d / CLK_TCK / seconds * 100))
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def running(pattern: str) -> list[int]:
    me = os.getpid()
    return [p for p in all_pids() if p != me and pattern in " ".join(cmdline(p))]


def machine_state(title: str = "machine") -> dict:
    """Print and return nproc, load, uptime, memory, what of the project is running, and the
    busiest processes over one second."""
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    mem = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            mem[k] = int(v.split()[0]) // 1024
    busy = busiest(1.0)
    state = {
        "nproc": NPROC, "loadavg": load, "uptime_min": round(up / 60), "mem_avail_mb": mem.get("MemAvailable"),
        "consume_fixes": len(running("consume_fixes")), "celery_worker": len([p for p in running("celery") if "worker" in cmdline(p)]),
        "celery_beat": len([p for p in running("celery") if "beat" in cmdline(p)]),
        "uvicorn": sorted({label(p) for p in running("uvicorn") if "uvicorn" in " ".join(cmdline(p)[:2])}),
        "pytest": len(running("pytest")),
        "busiest": [(name, pid, round(pct)) for name, pid, pct in busy],
    }
    print(f"{title}: nproc {NPROC}, loadavg {load}, up {state['uptime_min']} min, {state['mem_avail_mb']} MB available; "
          f"consume_fixes {state['consume_fixes']}, celery worker {state['celery_worker']}, beat {state['celery_beat']}, "
          f"uvicorn {', '.join(state['uvicorn']) or 'none'}, pytest {state['pytest']}")
    print("  busiest over 1 s (% of one core): "
          + (", ".join(f"{name}[{pid}] {pct:.0f}" for name, pid, pct in busy) or "nothing"))
    return state


def wait_quiet(max_wait: float, busy_pct: float = 10.0, window: float = 3.0) -> str:
    """Wait (at most `max_wait` s) until the machine is busy less than `busy_pct` % of all cores
    over `window` s and no test run (pytest) is going on; say how it went. Other engineers share
    this machine: a figure taken while their tests run says little."""
    start = time.monotonic()
    while True:
        b0 = machine_ticks()
        time.sleep(window)
        b1 = machine_ticks()
        busy = (b1[0] - b0[0]) / max(1, b1[1] - b0[1]) * 100
        tests = len(running("pytest"))
        waited = time.monotonic() - start
        if busy < busy_pct and not tests:
            return f"quiet after {waited:.0f} s (busy {busy:.0f} % over {window:g} s)"
        if waited >= max_wait:
            return f"NOT quiet after {waited:.0f} s (busy {busy:.0f} %, {tests} pytest processes): measuring anyway"


# ---------------------------------------------------------------------------- wrk


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    print("wrk not found: apt-get install -y wrk", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "wrk"], env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "wrk"], env=env, stdout=subprocess.DEVNULL, check=True)
    path = shutil.which("wrk")
    if not path:
        sys.exit("wrk could not be installed")
    return path


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rate: float  # requests per second (any status)
    ok_rate: float  # 2xx per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    statuses: dict[str, int]
    socket_errors: dict[str, int]
    not_accepted: int
    bad_bodies: str
    cpu_s: float = 0.0  # wrk's own CPU time (user + system)
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def non_2xx(self) -> int:
        return sum(c for s, c in self.statuses.items() if not s.startswith("2"))


def run_wrk(base: str, *, seconds: float, threads: int, connections: int, lua_args: list[str],
            timeout_s: float = 5.0, on_start=None, script: Path = LUA) -> tuple[WrkResult, subprocess.Popen]:
    """wrk with bench/location.lua (or `script`, which prints the same WRKJSON line);
    `on_start(proc)` is called once it runs (e.g. to add its pid to a CPU meter). Bounded: wrk
    stops after `seconds`, and is killed 30 s later if not."""
    refuse_non_loopback(base)
    wrk = ensure_wrk()
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", f"{max(1, int(timeout_s))}s",
           "-s", str(script), base, "--", *lua_args]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if on_start:
        on_start(proc)
    try:
        out, err = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk was reaped: its CPU is in here
    cpu_s = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result (exit {proc.returncode}): {out[-800:]} {err[-800:]}")
    data = json.loads(line[len("WRKJSON "):])
    secs = data["duration_us"] / 1e6
    lat = data["latency_us"]
    ok = sum(c for s, c in data["statuses"].items() if s.startswith("2"))
    return WrkResult(
        requests=data["requests"], seconds=secs, rate=data["requests"] / secs, ok_rate=ok / secs,
        p50_ms=lat["p50"] / 1000, p90_ms=lat["p90"] / 1000, p99_ms=lat["p99"] / 1000, p999_ms=lat["p999"] / 1000,
        max_ms=lat["max"] / 1000, statuses=data["statuses"],
        socket_errors={k: v for k, v in data["errors"].items() if v and k != "status"},
        not_accepted=data["not_accepted"], bad_bodies=data["bad_bodies"], cpu_s=cpu_s, raw=data,
    ), proc


def health_baseline(base: str, *, seconds: float = 10, threads: int = 2, connections: int = 32) -> WrkResult:
    """The same server's GET /health/ (one query, one Redis PING, through Django) with wrk."""
    result, _ = run_wrk(base, seconds=seconds, threads=threads, connections=connections, lua_args=["health"])
    print(f"GET /health/ (wrk -t{threads} -c{connections}, {result.seconds:.0f} s): {result.ok_rate:,.0f} req/s, "
          f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, non-2xx {result.non_2xx}"
          + (f", socket errors {result.socket_errors}" if result.socket_errors else ""), flush=True)
    return result


# ---------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except Exception:  # noqa: BLE001 - not up yet
        return 0


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM a helper process the bench started (a consumer), SIGKILL it after `timeout`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


class Server:
    """uvicorn (config.asgi, N workers) on a free loopback port, plus `consumers` × consume_fixes;
    logs in a temporary directory; `stop()` ends exactly the processes it started."""

    def __init__(self, *, workers: int = 2, consumers: int = 1, port: int | None = None, env: dict | None = None):
        self.workers, self.consumers = workers, consumers
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="bench-server-"))
        (self.dir / "prometheus").mkdir()
        self.env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(self.dir / "prometheus"), **(env or {}))
        self.env.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
        # the drop-off geofence as the figures before it went off by default were measured (its
        # Redis read on delivery-completed; the bench puts its drivers at the door)
        self.env.setdefault("DROPOFF_GEOFENCE_METERS", "200")
        self.procs: list[subprocess.Popen] = []
        self.web: subprocess.Popen | None = None
        self.consumer_procs: list[subprocess.Popen] = []

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, attempts: int = 3) -> None:
        py = str(ROOT / ".venv/bin/python")
        for attempt in range(1, attempts + 1):
            self.web = self._spawn("uvicorn", [
                str(ROOT / ".venv/bin/uvicorn"), "config.asgi:application", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers), "--no-access-log", "--lifespan", "off",
                "--http", "common.httpprotocol:HttpToolsProtocol", "--ws", "common.wsprotocol:WebSocketProtocol", "--ws-max-size", "65536",  # as deployed
            ])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.web.poll() is None:
                if _get(self.base + "/health/") == 200:
                    break
                time.sleep(0.3)
            if self.web.poll() is None and _get(self.base + "/health/") == 200:
                break
            tail = (self.dir / "uvicorn.log").read_text()[-1500:]
            self._end(self.web)
            if attempt == attempts:
                raise RuntimeError(f"uvicorn did not come up on {self.base}:\n{tail}")
            print(f"uvicorn did not come up (attempt {attempt}; a mid-edit elsewhere?), retrying in 60 s:\n{tail}",
                  file=sys.stderr, flush=True)
            time.sleep(60)
        for i in range(self.consumers):
            self.consumer_procs.append(self._spawn(f"consume_fixes-{i}", [py, "manage.py", "consume_fixes", "--consumer",
                                                                          f"bench-{os.getpid()}-{i}"]))
        time.sleep(1.0)
        for p in self.consumer_procs:
            if p.poll() is not None:
                raise RuntimeError(f"consume_fixes exited: {(self.dir / 'consume_fixes-0.log').read_text()[-1500:]}")
        print(f"server: uvicorn --workers {self.workers} on {self.base} (pid {self.web.pid}), "
              f"{self.consumers} × consume_fixes {[p.pid for p in self.consumer_procs]}; logs in {self.dir}", flush=True)

    def web_pids(self) -> list[int]:
        return with_descendants([self.web.pid]) if self.web else []

    def consumer_pids(self) -> list[int]:
        return [p.pid for p in self.consumer_procs]

    @staticmethod
    def _end(proc: subprocess.Popen, timeout: float = 15) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the process and its workers only
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            self._end(proc)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


async def gather_bounded(limit: int, make_coros) -> list:
    """Run the coroutines, `limit` at a time; the first failure cancels the rest."""
    sem = asyncio.Semaphore(limit)

    async def run(make):
        async with sem:
            return await make()

    tasks = [asyncio.ensure_future(run(m)) for m in make_coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
