# Every target sets up .venv itself (pinned requirements + the project, editable).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv promtool browser demo test test-fast test-random mutation serve bench soak lifecycle lint clean

$(STAMP): requirements.txt requirements-dev.txt requirements-selfhosted.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	# The selfhosted provider's extra (torch CPU 2.13.0, transformers, peft, trl): its tests train.
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-selfhosted.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

venv: $(STAMP) promtool browser

## promtool (Debian's prometheus package) for the alert-rule tests; installed once, quietly.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
	  || echo "promtool: could not install Debian's prometheus package; the promtool tests will fail under make test"; }

## Debian's chromium and chromium-driver for the browser tests of the UI (selenium drives them).
browser:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver) >/dev/null 2>&1 \
	  || echo "browser: could not install Debian's chromium and chromium-driver; the browser tests will fail under make test"; }

## the main job: the weekly DAG end to end on local services
demo: venv
	$(PY) -m fine_tuning.dev.demo

## Airflow UI/REST on 127.0.0.1:8080 with the local services, until Ctrl-C; DEMO_DATA=1 seeds
## the demo's posts and simulates the content agent, so a triggered run has data to work on
serve: venv
	$(PY) -m fine_tuning.dev.serve $(if $(DEMO_DATA),--demo-data)

## lint (ruff, format check, mypy), then the whole test suite; CI's command (.ci/run).
## FINE_TUNING_TESTS_STRICT=1: every extra and tool is installed here, so a skip is a failure.
test: lint
	FINE_TUNING_TESTS_STRICT=1 $(PY) -m pytest -q -p no:cacheprovider

## every test but the slow ones in a random order (pytest-randomly; RANDOM_SEED=n repeats one)
test-random: venv
	FINE_TUNING_TESTS_STRICT=1 $(PY) -m pytest -q -p no:cacheprovider -p randomly -m "not slow" \
	  $(if $(RANDOM_SEED),--randomly-seed=$(RANDOM_SEED))

## lint, then every test but the slow ones (end to end, real Airflow, scale)
test-fast: lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

## collection, A/B evaluation, metrics cache and DAG parse at scale (up to 5M/10M posts, ~30 min);
## BENCH_MAX_POSTS caps the sizes; tables on stdout, JSON in bench/results/ (BENCH_RESULTS_DIR)
bench: venv
	$(PY) bench/collect_bench.py
	$(PY) bench/eval_bench.py
	$(PY) bench/cache_bench.py
	$(PY) bench/parse_time.py
	$(PY) bench/decision_bench.py
	$(PY) bench/guard_bench.py

## the training half under injected OpenAI faults (0/10/30/50%); SOAK_RUNS per rate (default 20)
soak: venv
	SOAK_RUNS=$${SOAK_RUNS:-20} $(PY) bench/fault_soak.py
	$(PY) bench/breaker_overhead.py

## weeks of the loop, unattended, with faults and hourly invariant checks (LIFECYCLE_WEEKS, default 9);
## bench/results/lifecycle.json, exit 1 on any violation. make test runs a 2-week version.
lifecycle: venv
	$(PY) -m fine_tuning.dev.lifecycle --weeks $${LIFECYCLE_WEEKS:-9}

## mutation check (mutmut, not run by CI) of stats, breakers, routing and rollout against their
## unit tests (bench/mutmut.toml); needs the local PostgreSQL and Redis. MUTMUT_ARGS="name*" picks
## mutants, e.g. "fine_tuning.routing*". MUTMUT_SAMPLE=n checks n mutants per module drawn at
## random (bench/mutation_sample.py; all ~3,600 take hours on 2 cores): a score with its
## standard error. Work and results stay in .local/mutation.
MUTATION_DIR := .local/mutation
MUTMUT := $(CURDIR)/$(VENV)/bin/mutmut
mutation: venv
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-mutation.txt
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)
	ln -s $(CURDIR)/include $(MUTATION_DIR)/src
	ln -s $(CURDIR)/tests $(CURDIR)/plugins $(CURDIR)/dags $(CURDIR)/include $(MUTATION_DIR)/
	cat pyproject.toml bench/mutmut.toml > $(MUTATION_DIR)/pyproject.toml
	# A sample: a first run generates every mutant and the test stats and stops at a name that
	# matches none (mutmut asserts); the second checks the drawn names.
	cd $(MUTATION_DIR) && if [ -n "$(MUTMUT_SAMPLE)" ]; then \
	    $(MUTMUT) run fine_tuning.no_such_mutant || true; \
	    names=$$($(CURDIR)/$(PY) $(CURDIR)/bench/mutation_sample.py $(MUTMUT_SAMPLE) $(MUTMUT_ARGS)) || exit 1; \
	    $(MUTMUT) run $$names || true; \
	else $(MUTMUT) run $(MUTMUT_ARGS) || true; fi
	cd $(MUTATION_DIR) && $(CURDIR)/$(PY) $(CURDIR)/bench/mutation_score.py

## ruff (its rules include AIR: Airflow 3 imports), ruff's format check, mypy (pyproject.toml)
lint: venv
	$(VENV)/bin/ruff check include plugins dags
	$(VENV)/bin/ruff format --check include plugins dags
	$(VENV)/bin/mypy

clean:
	rm -rf .local
