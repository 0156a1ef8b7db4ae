# The two fresh-machine commands: `make demo` and `make test`. Each creates .venv when it is missing.
.PHONY: demo test venv typecheck clean-venv

venv:
	@bash scripts/bootstrap.sh

demo: venv
	.venv/bin/automl-tl demo

typecheck: venv
	.venv/bin/python -m mypy

test: venv
	.venv/bin/python -m mypy
	.venv/bin/python -m pytest -q --durations=12

clean-venv:
	rm -rf .venv
