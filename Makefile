# The two commands of the README:
#   make demo   set everything up, then run the local federated demo (Table 1 + plots)
#   make test   set everything up, then run the test suite (.ci/run calls this)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgehmoe-installed
# --dashboard: the run's live web page at http://127.0.0.1:8765/ (printed first; it stops with the demo)
DEMO_ARGS ?= --dataset synthetic --clients 3 --rounds 30 --model both --weighting sqrt --expert-epochs 3 --eval-every 5 \
    --dashboard 127.0.0.1:8765
PYTEST_ARGS ?=

.PHONY: demo test setup system-deps clean pi-check

demo: system-deps setup
	$(VENV)/bin/edgehmoe-server simulate $(DEMO_ARGS) --out runs/demo --force

test: system-deps setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml tools/setup_env.sh
	VENV=$(VENV) bash tools/setup_env.sh
	touch $(STAMP)

# The device side in an emulated arm64 Raspberry Pi userland (root; docs/pi.md "A Raspberry Pi in a
# box"). PI_ARGS=--edge-only for the torch-free part that CI runs.
PI_ARGS ?=
pi-check: system-deps setup
	EDGEHMOE_HOST_VENV=$(abspath $(VENV)) bash tools/pi_userland.sh $(PI_ARGS)

system-deps:
	bash tools/install_system_deps.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
