# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test test-fast test-tools bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The demo needs the package, its picture extra and the faster CPU runtime (OpenVINO, in the cpu extra: the base
# install stays lean, and the engine says once how to get it where it is missing); the tests need everything.
$(DEMO_STAMP): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -c constraints.txt -e ".[demo,cpu]"
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP) $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/segmote demo

# The whole suite, with what its tests need: dicom3tools' dciodvfy validates the DICOM SEG files they write.
test: $(STAMP) test-tools
	$(PY) -m pytest -q tests

# The tests that load no LiteMedSAM and read no real scan (not marked slow): about two minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# dciodvfy from the platform's packages where it has apt-get and we are root; elsewhere the one test that needs it
# (tests/test_dicom_seg.py::test_dicom_seg_passes_dciodvfy) is skipped and says why.
test-tools:
	@command -v dciodvfy >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    { apt-get install -y -qq dicom3tools || { apt-get update -qq && apt-get install -y -qq dicom3tools; }; } \
	      >/dev/null 2>&1 || echo "note: dicom3tools could not be installed; the DICOM SEG validation test will be skipped" >&2; \
	  else \
	    echo "note: dciodvfy (dicom3tools) is not installed and cannot be installed here; the DICOM SEG validation test will be skipped" >&2; \
	  fi; }

bench: $(STAMP)
	$(PY) benchmarks/bench.py --size small

clean:
	rm -rf $(VENV) segmote-demo
