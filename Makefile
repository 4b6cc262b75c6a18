# Two commands set everything up on a fresh machine:
#   make lab    install what is missing, then open the course in JupyterLab
#   make test   install what is missing, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: lab test install release grade clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (detlab)" >/dev/null
	touch $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab labs/

test: $(STAMP)
	sh tests/browser/ensure_chromium.sh
	$(PY) -m pytest

release: $(STAMP)
	$(PY) -m detlib.release

grade: $(STAMP)
	$(PY) -m detlib.grade labs/

clean:
	rm -rf $(VENV) .pytest_cache
