# sneakers23: `make run` serves the store, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)

.PHONY: run test cluster seed lint bench soak clean

run: $(STAMP)
	$(PY) sneakers23.py

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

seed: $(STAMP)
	$(PY) sneakers23.py seed

# Three nodes of peers.toml in the foreground; Ctrl-C stops them all.
cluster: $(STAMP)
	$(PY) sneakers23.py seed
	@SNEAKERS23_ADMIN_TOKEN=$${SNEAKERS23_ADMIN_TOKEN:-$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(24))')}; \
	export SNEAKERS23_ADMIN_TOKEN; \
	echo "admin token for the cluster: $$SNEAKERS23_ADMIN_TOKEN"; \
	trap 'kill $$(jobs -p) 2>/dev/null' INT TERM; \
	for node in a b c; do \
	  $(PY) sneakers23.py --config peers.toml --node $$node & \
	done; \
	wait; wait

lint: $(STAMP)
	$(VENV)/bin/ruff check sneakers23.py tests bench packaging

# matplotlib (the scaling curve's PNG) is for the benchmarks only.
BENCH_STAMP := $(VENV)/.bench-$(shell cksum < bench/requirements.txt | cut -d' ' -f1)

$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(PY) -m pip install --quiet -r bench/requirements.txt
	rm -f $(VENV)/.bench-*
	touch $@

bench: $(BENCH_STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

# Not part of `make test`: 10 minutes of purchases, restocks and 2,000
# churning SSE streams on one node; fails if RSS, fds or greenlets grow
# more than 10%. SOAK_ARGS='--minutes 1' for a short run.
soak: $(STAMP)
	$(PY) bench/soak.py $(SOAK_ARGS)

# One file holding the server, views/, static/ and the seed catalogue
# (PyInstaller, pinned in packaging/requirements.txt): dist/sneakers23.
PYI_STAMP := $(VENV)/.pyinstaller-$(shell cksum < packaging/requirements.txt | cut -d' ' -f1)
BUNDLED := sneakers23.py data/catalog.toml $(wildcard views/*.tpl static/*) \
	$(wildcard packaging/sneakers23.spec packaging/hooks/*.py)

.PHONY: binary
binary: dist/sneakers23

dist/sneakers23: $(STAMP) $(PYI_STAMP) $(BUNDLED)
	$(VENV)/bin/pyinstaller --noconfirm --log-level WARN \
	  --distpath dist --workpath build packaging/sneakers23.spec
	@ls -l $@

$(PYI_STAMP): packaging/requirements.txt | $(STAMP)
	$(PY) -m pip install --quiet -r packaging/requirements.txt
	rm -f $(VENV)/.pyinstaller-*
	touch $@

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist
