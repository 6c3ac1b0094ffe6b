# Two commands set up everything on a fresh Debian 12 machine as root:
#   make demo   - system packages, .venv with the package and all the README's tour uses
#                 (matplotlib for plots, qemu.qmp for qmp-shell), then `postcopy demo`
#   make test   - the same with the dev extras, then the test suite
# Both build .venv from nothing every time, so a missing install step shows at once.
# VENV=DIR builds it elsewhere (the tour's test does); SYSTEM= skips the apt step.

VENV ?= .venv
PYTHON ?= python3
SYSTEM ?= system
# pip's own notices (a newer pip exists) are not the project's to show
PIP := $(VENV)/bin/python -m pip --disable-pip-version-check
SYSTEM_PACKAGES := python3 python3-venv python3-dev gcc binutils make iproute2 procps openssl util-linux

.PHONY: system venv venv-dev demo test lint guests guest clean backends-soak soak fuzz fuzz-wire fuzz-qmp \
	service-bench recovery-soak qemu

system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing system packages: $(SYSTEM_PACKAGES)"; \
	  apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(SYSTEM_PACKAGES) >/dev/null; \
	else \
	  echo "not root or no apt-get: assuming $(SYSTEM_PACKAGES) are present"; \
	fi

venv: $(SYSTEM)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[plot,qmp]'

venv-dev: $(SYSTEM)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev,plot,qmp]'

demo: venv
	$(VENV)/bin/postcopy demo

# not for the demo or the tests: QEMU 7.2 (Debian 12's) for benchmarks/qemu/, the
# comparison against QEMU's own postcopy on this machine (compare.sh, compare-hugetlbfs.sh)
qemu:
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  qemu-system-x86 >/dev/null

test: venv-dev
	$(VENV)/bin/python -m pytest

lint:
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

guests:
	guests/build.sh

# not in the test suite: ~100 migrations of memtouch and randwrite on every RAM backend
# (ram, memfd, memfd-hugetlb, a file on hugetlbfs), every mode, 1 and 2 vCPUs, each ending
# with x-verify; 24 runs per mode on huge pages. As root; exit status 1 on any failure.
backends-soak:
	$(VENV)/bin/python benchmarks/backends_soak.py --out backends-soak.jsonl

# not in the test suite: one guest through 50 migrations in a chain (precopy, postcopy,
# preempt in turn, every hop verified, progress checked), then one VM through 200 failed
# or cancelled migrations with its fds, threads and RSS checked flat. Exit status 1 on any
# failure; the last line is the summary.
soak:
	$(VENV)/bin/python benchmarks/soak.py --out soak.jsonl

# not in the test suite: 50 postcopy migrations whose link is broken at a random point
# (proxy resets anywhere, inside a RAM frame and inside the bitmap reply, a frozen link, a
# lost return direction, ss -K as root, a vCPU blocked on a page through the outage), each
# recovering by itself and ending with x-verify; no process or socket may be left. Exit
# status 1 on any failure; the last line is the summary with the figures.
recovery-soak:
	$(VENV)/bin/python benchmarks/recovery_soak.py --runs 50 --out recovery-soak.jsonl

# not in the test suite: the wire fuzzer and the QMP fuzzer at 1,000,000 inputs each (the
# suite runs 100k and 10k); each prints its figures; any escape fails. FUZZ_SEED varies it,
# FUZZ_ITERATIONS sizes it. Each half takes ~12 min on 2 cores: `make fuzz-wire` and `make
# fuzz-qmp` run one at a time (under a lock held per half, say).
FUZZ_ITERATIONS ?= 1000000
FUZZ_PYTEST := FUZZ_ITERATIONS=$(FUZZ_ITERATIONS) $(VENV)/bin/python -m pytest -p no:cacheprovider -s -q

fuzz: fuzz-wire fuzz-qmp

fuzz-wire:
	$(FUZZ_PYTEST) tests/test_wire_fuzz.py::test_fuzz_decoder_only_raises_protocol_error_and_stays_in_bounds

fuzz-qmp:
	$(FUZZ_PYTEST) tests/test_qmp_fuzz.py::test_fuzz_qmp_answers_everything_and_no_handler_escapes

# not in the test suite: issue 15's figures. The bench set `service` (a 1 GiB kvstore guest
# under 5,000 requests/s, migrated by precopy, postcopy and postcopy-preempt) run
# SERVICE_PIECES times with --repeat SERVICE_REPEAT into one file (runs are numbered on),
# then its summary (per mode: runs clean, p99, longest gap, downtime, blocktime; how much
# each postcopy mode shortens the longest gap against precopy) and --plot, whose
# <out>-service.png has the latency of each mode over time with the phases as bands.
# On a shared machine take a lock per piece: make service-bench LOCK=/run/lock/bench.lock
# (10 runs of each mode in two pieces of ~7 min on 2 cores). Exit status 1 if a run failed.
SERVICE_STAMP := $(shell date +%Y%m%d-%H%M%S)
SERVICE_OUT ?= runs/service-$(SERVICE_STAMP).jsonl
SERVICE_PIECES ?= 2
SERVICE_REPEAT ?= 5
LOCK ?=

service-bench:
	@status=0; for piece in $$(seq $(SERVICE_PIECES)); do \
	  $(if $(LOCK),flock $(LOCK)) $(VENV)/bin/postcopy bench service --repeat $(SERVICE_REPEAT) \
	    --out $(SERVICE_OUT) >/dev/null || status=1; \
	done; \
	$(VENV)/bin/postcopy bench --from $(SERVICE_OUT) --plot; \
	echo "results: $(SERVICE_OUT)"; exit $$status

# a guest of one's own, built as the built-in ones are: make guest SRC=my.S OUT=my.bin
# (guests/examples/hello.S is a template; README, "Build your own guest")
guest:
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make guest SRC=FILE.S|FILE.c OUT=FILE.bin" >&2; exit 2; }
	guests/build.sh --source "$(SRC)" "$(OUT)"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
