# Two promises: `make demo` runs the infrastructure on the simulator, `make test` runs every test.
# Both start from a fresh Debian 12 machine as root and install what they need; rerunning is cheap.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# The tools installed in the virtual environment come first (ansible-lint, ansible-test expect it).
export PATH := $(BIN):$(PATH)
QUBESIM := $(BIN)/qubesim
# Debian packages the simulator and the tests run on (qubesim builds its template from this root;
# openssh-server serves the logs repository in the signing-chain tests).
APT_PACKAGES := python3 python3-venv sudo util-linux iproute2 procps git make gnupg openssh-server nginx gunicorn
# The pip that ansible-test (ansible-core 2.19) seeds its virtualenvs with: it looks for
# ~/.ansible/test/cache/get_pip_24_2.py before downloading get-pip from the internet.
ANSIBLE_TEST_PIP := 24.2
COLLECTION_LINK := .collections/ansible_collections/qubes_infra/build
# What the collection artifact leaves out (galaxy.yml build_ignore) is not checked by ansible-test.
NOT_COLLECTION := ^(qubesim|tests/(unit|integration|utils)|bench|demo|docs|\.ci)/|^(Makefile|pyproject\.toml)$$

.PHONY: help demo test bootstrap apt lint sanity unit integration bench clean

help:
	@echo "make demo   - run the infrastructure on qubesim (the simulated Qubes host) and one build"
	@echo "make test   - lint, sanity, unit and integration tests"
	@echo "make lint | sanity | unit | integration - one test layer"
	@echo "make bench  - benchmarks (connection plugin, log path), printed as tables"
	@echo "make clean  - remove the virtual environment and the simulated host"

demo: bootstrap
	$(QUBESIM) init
	$(QUBESIM) world up
	$(QUBESIM) dom0 -- ansible-playbook -i inventory/qubesim/build_infra.yml \
	  -e @"$$($(QUBESIM) world variables)" site.yml
	$(QUBESIM) dom0 -- qvm-ls
	$(QUBESIM) dom0 -- demo/build-and-verify

test: lint sanity unit integration

bootstrap: apt $(VENV)/.installed $(COLLECTION_LINK)

# apt runs only when a package is missing, so that reruns stay fast.
apt:
	@installed=$$(dpkg-query -W -f='$${db:Status-Status}\n' $(APT_PACKAGES) 2>/dev/null | grep -cx installed || true); \
	if [ "$$installed" -ne $(words $(APT_PACKAGES)) ]; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(APT_PACKAGES); \
	fi

$(VENV)/.installed: pyproject.toml | apt
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

$(COLLECTION_LINK):
	mkdir -p $(dir $@)
	ln -sfn ../../.. $@

lint: bootstrap
	ruff check .
	ruff format --check .
	antsibull-changelog lint
	ansible-lint --profile production

# ansible-test needs the collection at .../ansible_collections/NAMESPACE/NAME; it checks a copy of
# what the artifact contains, in a fresh temporary directory so that two checkouts on one machine
# never share it. Its virtualenvs are seeded offline (tests/utils/get_pip.py).
sanity: bootstrap
	install -D -m 0644 tests/utils/get_pip.py ~/.ansible/test/cache/get_pip_$(subst .,_,$(ANSIBLE_TEST_PIP)).py
	tree=$$(mktemp -d) && trap 'rm -rf "$$tree"' EXIT; \
	collection=$$tree/ansible_collections/qubes_infra/build; \
	mkdir -p "$$collection"; \
	git ls-files --cached --others --exclude-standard | grep -vE '$(NOT_COLLECTION)' \
	  | while read -r file; do [ ! -e "$$file" ] || echo "$$file"; done \
	  | xargs -d '\n' cp --parents -t "$$collection"; \
	cd "$$collection" && ansible-test sanity --venv --python 3.11 --color no

unit: bootstrap
	pytest tests/unit

# Root and the simulated host: the tests run inside dom0, as a real dom0's admin would run them.
integration: bootstrap
	$(QUBESIM) init
	$(QUBESIM) dom0 -- pytest tests/integration

# Timing lives here, never in tests: ratios measured side by side in one run.
bench: bootstrap
	$(QUBESIM) init
	$(QUBESIM) dom0 -- python bench/connection/run.py
	$(QUBESIM) dom0 -- python bench/signing_chain/run.py
	$(QUBESIM) dom0 -- python bench/webhooks/run.py

clean:
	-[ -x $(QUBESIM) ] && $(QUBESIM) destroy
	rm -rf $(VENV) .collections tests/output
