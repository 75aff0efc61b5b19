# The README's two commands, plus the benchmarks. Each target installs what it needs.
.PHONY: check demo bench lint clean

check:
	bash scripts/check.sh

demo:
	bash scripts/demo.sh

bench:
	bash scripts/bench.sh

lint:
	bash scripts/setup.sh && .venv/bin/ruff check tproxy tests twisted bench && .venv/bin/mypy

clean:
	rm -rf .venv _trial_temp .coverage build *.egg-info
