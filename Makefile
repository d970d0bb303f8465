# The two commands of the README: `make convert` (main job on the bundled defaults) and `make test`.
PY ?= python3

.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch .setup-done

setup: .setup-done

convert: .setup-done
	linearize convert

test: .setup-done
	$(PY) -m pytest -q -m "not smoke"

.PHONY: setup convert test
