# Local development and CI entry points. `make run` and `make test` are the two commands.
PORT ?= 8000
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (each has its own test database and Redis databases,
# config/settings/test.py); TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
PY := .venv/bin/python

.PHONY: setup migrate run test clean cluster cluster-stop cluster-status

setup:
	bash scripts/setup.sh

migrate: setup
	$(PY) manage.py migrate --noinput
	$(PY) manage.py setup_periodic_tasks
	$(PY) manage.py setup_roles
	$(PY) manage.py collectstatic --noinput -v0

run: migrate
	$(PY) manage.py seed_demo
	@echo ""
	@echo "Admin (ops console): http://127.0.0.1:$(PORT)/admin/"
	@echo "API docs:            http://127.0.0.1:$(PORT)/v2/docs/"
	@echo "Ops login:           ops / $${DEMO_OPS_PASSWORD:-ops}"
	@echo "Processes:           PORT=$(PORT) supervisorctl -c deploy/supervisord.conf status"
	@echo ""
	rm -rf var/prometheus/$(PORT) && mkdir -p var/prometheus/$(PORT) var/run var/log
	PORT=$(PORT) HOST=$${HOST:-127.0.0.1} WEB_CONCURRENCY=$${WEB_CONCURRENCY:-2} \
		CELERY_CONCURRENCY=$${CELERY_CONCURRENCY:-2} PROMETHEUS_MULTIPROC_DIR=$(CURDIR)/var/prometheus/$(PORT) \
		TRACKING_BASE_URL=$${TRACKING_BASE_URL:-http://127.0.0.1:$(PORT)/track} \
		FORWARDED_ALLOW_IPS=$${FORWARDED_ALLOW_IPS-} \
		exec supervisord -n -c deploy/supervisord.conf

# The local multi-node run: HAProxy :8080 → two web instances (:8101, :8102), PgBouncer :6433
# (transaction mode) → PostgreSQL, two workers, beat, fixes (docs/operations.md). It migrates and
# seeds like `run`, then runs in the foreground (Ctrl-C stops it; DETACH=1: in the background,
# `make cluster-stop` stops it). Running it again while it runs changes nothing.
cluster: setup
	bash scripts/cluster.sh start $(if $(DETACH),--detach)

cluster-stop:
	bash scripts/cluster.sh stop

cluster-status:
	bash scripts/cluster.sh status

# pytest-django creates its own test database, so no migrate here. The import contracts
# (.importlinter, docs/architecture.md) are checked first: a broken layer fails the run.
test: setup
	.venv/bin/lint-imports
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
