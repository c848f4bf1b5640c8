# Two promises: `make demo` runs the infrastructure on the simulator, `make test` runs every test.
# Both start from a fresh Debian 12 machine as root and install what they need; rerunning is cheap.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# The oldest supported ansible-core (make floor) has a virtual environment of its own.
FLOOR_VENV := .venv-floor
FLOOR_BIN := $(CURDIR)/$(FLOOR_VENV)/bin
# The tools installed in the virtual environment come first (ansible-lint, ansible-test expect it).
export PATH := $(BIN):$(PATH)
QUBESIM := $(BIN)/qubesim
# Debian packages the simulator and the tests run on (qubesim builds its template from this root;
# openssh-server serves the logs repository in the signing-chain tests; tinyproxy is the updates
# proxy of sys-net).
APT_PACKAGES := python3 python3-venv sudo util-linux iproute2 procps git make gnupg openssh-server \
  tinyproxy
# The pip that ansible-test (ansible-core 2.19) seeds its virtualenvs with: it looks for
# ~/.ansible/test/cache/get_pip_24_2.py before downloading get-pip from the internet.
ANSIBLE_TEST_PIP := 24.2
COLLECTION_LINK := .collections/ansible_collections/qubes_infra/build
# What the collection artifact leaves out (galaxy.yml build_ignore) is not checked by ansible-test.
NOT_COLLECTION := ^(qubesim|tests/(unit|integration|utils)|extensions|bench|demo|\.ci)/|^(Makefile|pyproject\.toml)$$

.PHONY: help demo test test-lane-checks test-lane-qubes test-lane-site bootstrap apt template-packages \
  lint sanity unit integration integration-other-release floor floor-unit floor-site molecule bench \
  clean

help:
	@echo "make demo   - run the infrastructure on qubesim (the simulated Qubes host) and one build"
	@echo "              (a Qubes 4.3 host; QUBESIM_RELEASE=4.2 make demo for a 4.2 one)"
	@echo "make test   - lint, sanity, unit and integration tests"
	@echo "make lint | sanity | unit | integration | molecule - one test layer"
	@echo "make integration-other-release - qubesim's other release (4.2) on the slice that proves it"
	@echo "make floor  - the oldest supported ansible-core: unit tests, then site.yml and verify.yml"
	@echo "              (make floor-unit | floor-site - one of the two)"
	@echo "make molecule SCENARIO=build_vm - one molecule scenario"
	@echo "make bench  - benchmarks (connection plugin, log path, webhook receiver), printed as tables"
	@echo "make clean  - remove the virtual environment and the simulated host"

demo: bootstrap
	$(QUBESIM) init
	$(QUBESIM) world up
	$(QUBESIM) dom0 -- ansible-playbook -i inventory/qubesim/build_infra.yml \
	  -e @"$$($(QUBESIM) world variables)" site.yml
	$(QUBESIM) dom0 -- ansible-playbook -i inventory/qubesim/build_infra.yml \
	  -e @"$$($(QUBESIM) world variables)" playbooks/verify.yml
	$(QUBESIM) dom0 -- qvm-ls
	$(QUBESIM) dom0 -- demo/build-and-verify

# make test runs in three lanes side by side, each part's output printed whole when it ends. Most
# of an integration test's time goes to waiting on qubes, so two cores carry them well:
# - the checks that need no simulated host, then the other release's slice and molecule;
# - qubesim's and the plugins' tests and the refused inventories, then the oldest ansible-core's
#   site;
# - the tests of the converged site, the roles and the installed artifact.
# Each lane's hosts live under a home of their own and go when the lane ends. Only the last lane
# uses this machine's network (its tests download through the updates proxy); the other lanes'
# hosts get a network namespace of their own (tests/utils/own-network) with only a loopback, so
# that every host's qubes and world bind the same loopback ports without meeting.
test: bootstrap $(FLOOR_VENV)/.installed
	$(MAKE) --jobs=3 --output-sync=target --keep-going test-lane-checks test-lane-qubes \
	  test-lane-site

# A lane runs its parts one after the other (one goal per make: several would run side by side).
test-lane-checks:
	$(MAKE) lint
	$(MAKE) sanity
	$(MAKE) unit
	$(MAKE) floor-unit
	$(MAKE) integration-other-release
	$(call in_lane,molecule) $(OWN_NETWORK) $(MAKE) molecule

# The floor's site converges a fresh host: the qubes the tests before made keep keys of their own.
test-lane-qubes:
	$(call in_lane,qubes) $(OWN_NETWORK) $(MAKE) integration INTEGRATION_TESTS="$(QUBE_TESTS)"
	$(call in_lane,floor) $(OWN_NETWORK) $(MAKE) floor-site

test-lane-site:
	$(call in_lane,site) $(MAKE) integration INTEGRATION_TESTS="$(SITE_TESTS)"

# One lane's host (named after the lane) for the rest of the recipe line.
in_lane = export QUBESIM_HOME=$(LANE_HOME)-$(1); trap '$(QUBESIM) destroy >/dev/null' EXIT;
LANE_HOME := /var/lib/qubesim-lane
OWN_NETWORK := $(CURDIR)/tests/utils/own-network
# The tests of qubesim and of the plugins, which make and remove qubes of their own, and the
# refusals of bad inventories, which change nothing; the others (the converged site, the roles,
# the installed artifact) share the qubes the site converges.
QUBE_TESTS := tests/integration/qubesim tests/integration/plugins \
  tests/integration/playbooks/test_refused_inventory.py
SITE_TESTS := tests/integration/converged tests/integration/roles \
  tests/integration/playbooks/test_collection_artifact.py

bootstrap: apt $(VENV)/.installed $(COLLECTION_LINK) template-packages

# apt runs only when a package is missing, so that reruns stay fast.
# The packages' services are for the simulated qubes: policy-rc.d keeps them from starting on
# this machine (where they would hold the ports the qubes use).
define apt_install
installed=$$(dpkg-query -W -f='$${db:Status-Status}\n' $(1) 2>/dev/null | grep -cx installed || true); \
if [ "$$installed" -ne $$(echo $(1) | wc -w) ]; then \
  guard=/usr/sbin/policy-rc.d; \
  if [ ! -e $$guard ]; then printf '#!/bin/sh\nexit 101\n' > $$guard; chmod 755 $$guard; \
    trap "rm -f $$guard" EXIT; fi; \
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(1); \
fi
endef

apt:
	@$(call apt_install,$(APT_PACKAGES))

# The Debian packages the templates role gives qubesim's template, installed on this machine
# first (qubesim's template is made from its root), so that tests need not download them; Qubes'
# own packages (qubes-*) come with qubesim's template.
TEMPLATE_PACKAGES = $(shell $(BIN)/python -c 'import yaml; kinds = yaml.safe_load(open("roles/templates/defaults/main.yml"))["templates_packages"]; print(*sorted({name for kind in kinds.values() for name in kind["Debian"] if not name.startswith("qubes-")}))')

template-packages: $(VENV)/.installed
	@$(call apt_install,$(TEMPLATE_PACKAGES))

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
INTEGRATION_TESTS := tests/integration
integration: bootstrap
	$(QUBESIM) init
	$(QUBESIM) dom0 -- pytest $(INTEGRATION_TESTS) --durations=15

# The other supported release, on the slice that proves what qubesim does differently there and
# what every release must do alike (boot, snapshots, minimal template, split-GPG's question, root
# in a qube through the collection's connection and become plugins), on a
# host of its own (and a loopback of its own) that goes when the slice ends.
OTHER_RELEASE := 4.2
OTHER_RELEASE_SLICE := $(addprefix tests/integration/qubesim/,test_releases.py test_boot.py \
  test_template_snapshots.py test_split_gpg.py test_privileges.py test_qvm_run.py) \
  tests/integration/plugins/connection/test_root.py
integration-other-release: bootstrap
	$(call in_lane,$(OTHER_RELEASE)) $(OWN_NETWORK) sh -c '$(QUBESIM) init --release $(OTHER_RELEASE) && \
	  $(QUBESIM) dom0 -- pytest $(OTHER_RELEASE_SLICE)'

# The oldest supported ansible-core (pyproject.toml's `floor`), in a virtual environment of its
# own: the unit tests of what runs on ansible-core (floor-unit: not the services in the qubes nor
# qubesim, which never import it), then (floor-site) the connection plugin's refusal of planted
# facts, which that version resolves through another hook, and the whole site and its
# verification converged from a fresh simulated host.
$(FLOOR_VENV)/.installed: pyproject.toml | apt
	[ -x $(FLOOR_BIN)/python ] || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_BIN)/pip install --quiet --disable-pip-version-check -e '.[floor]'
	@touch $@

floor: floor-unit floor-site

floor-unit: bootstrap $(FLOOR_VENV)/.installed
	$(FLOOR_BIN)/ansible --version | head -n 1
	PATH=$(FLOOR_BIN):$$PATH $(FLOOR_BIN)/pytest -q tests/unit \
	  --ignore=tests/unit/services --ignore=tests/unit/qubesim

# A command in dom0 with the floor's programs first (dom0's own PATH comes after, with its tools).
FLOOR_IN_DOM0 := $(QUBESIM) dom0 -- sh -c 'PATH="$$0:$$PATH" exec "$$@"' $(FLOOR_BIN)
floor-site: bootstrap $(FLOOR_VENV)/.installed
	$(QUBESIM) init
	$(QUBESIM) world up
	$(FLOOR_IN_DOM0) ansible --version | head -n 1
	$(FLOOR_IN_DOM0) pytest -q tests/integration/plugins/connection/test_hostile_qube.py -k facts
	$(FLOOR_IN_DOM0) ansible-playbook -i inventory/qubesim/build_infra.yml \
	  -e @"$$($(QUBESIM) world variables)" site.yml
	$(FLOOR_IN_DOM0) ansible-playbook -i inventory/qubesim/build_infra.yml \
	  -e @"$$($(QUBESIM) world variables)" playbooks/verify.yml

# The molecule scenarios (extensions/molecule: one per role and `default`, the whole site) on
# qubesim's example inventory with the world's variables; SCENARIO=NAME runs one of them.
molecule: bootstrap
	$(QUBESIM) init
	$(QUBESIM) world up
	$(QUBESIM) dom0 -- env QUBES_INFRA_MOLECULE_INVENTORY=$(CURDIR)/inventory/qubesim/build_infra.yml \
	  QUBES_INFRA_MOLECULE_VARS="$$($(QUBESIM) world variables)" \
	  molecule test $(if $(SCENARIO),--scenario-name $(SCENARIO),--all)

# Timing lives here, never in tests: ratios measured side by side in one run.
bench: bootstrap
	$(QUBESIM) init
	$(QUBESIM) dom0 -- python bench/connection/run.py
	$(QUBESIM) dom0 -- python bench/signing_chain/run.py
	$(QUBESIM) dom0 -- python bench/webhooks/run.py

clean:
	-[ -x $(QUBESIM) ] && $(QUBESIM) destroy
	rm -rf $(VENV) $(FLOOR_VENV) .collections tests/output
