# batchpush: `make demo` and `make test` set everything up from nothing on Debian.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests and the demo run: the real registry, skopeo (the
# independent checker), umoci (makes OCI layouts with gzip layers), the Pushgateway
# (the metrics tests push to it)
DEBS   := docker-registry skopeo umoci prometheus-pushgateway

.PHONY: setup system-deps demo test soak lint bench clean

setup: system-deps $(VENV)/.installed

system-deps:
	@missing=""; \
	[ -x /usr/bin/docker-registry ] || missing="$$missing docker-registry"; \
	command -v skopeo >/dev/null || missing="$$missing skopeo"; \
	command -v umoci >/dev/null || missing="$$missing umoci"; \
	[ -x /usr/bin/prometheus-pushgateway ] || missing="$$missing prometheus-pushgateway"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,cluster]'
	touch $@

demo: setup
	$(BIN)/python bench/demo.py

test: setup
	$(BIN)/python -m pytest -q

# the stress test, 50 runs with both cores loaded (tests/test_stress.py says what each run checks)
soak: setup
	BATCHPUSH_STRESS_RUNS=50 $(BIN)/python -m pytest -q -s tests/test_stress.py

lint: setup
	$(BIN)/ruff check batchpush tests bench
	$(BIN)/mypy batchpush

bench: setup
	@# bytecode compiled ahead, as installing the package does (an editable install does not)
	$(BIN)/python -m compileall -q batchpush >/dev/null
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache demo-data
