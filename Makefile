# Two commands: `make demo` (the main job) and `make test`. Both create .venv from exact pins first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv clean

venv: $(VENV)/.installed

# torch is pinned exactly (the CPU wheel on local disk); a looser pin pulls a multi-GB CUDA build.
$(VENV)/.installed: requirements-pins.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -r requirements-pins.txt
	touch $@

test: venv
	$(PY) -m pytest -q

demo: venv
	$(PY) -m egrpo_backend.demo --out demo_output

clean:
	rm -rf $(VENV) demo_output .pytest_cache
