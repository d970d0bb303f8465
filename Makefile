# The two commands of the README: `make convert` (main job on the bundled defaults) and `make test`.
PY ?= python3

.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch .setup-done

setup: .setup-done

# a 25-minute budget: the token counts of both stages are planned from a throughput probe (linearize/budget.py)
convert: .setup-done
	linearize convert --minutes 25

test: .setup-done
	$(PY) -m pytest -q -m "not smoke"

.PHONY: setup convert test
