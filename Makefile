# The two commands of the README:
#   make demo   set everything up, then run the local federated demo (Table 1 + plots)
#   make test   set everything up, then run the test suite (.ci/run calls this)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgehmoe-installed
DEMO_ARGS ?= --dataset synthetic --clients 3 --rounds 30 --model both --weighting sqrt --expert-epochs 3 --eval-every 5
PYTEST_ARGS ?=

.PHONY: demo test setup system-deps clean

demo: system-deps setup
	$(VENV)/bin/edgehmoe-server simulate $(DEMO_ARGS) --out runs/demo --force

test: system-deps setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml tools/setup_env.sh
	VENV=$(VENV) bash tools/setup_env.sh
	touch $(STAMP)

system-deps:
	bash tools/install_system_deps.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
