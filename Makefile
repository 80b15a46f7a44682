# `make test` and `make demo` create the virtual environment themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv lint typecheck test demo bench proto clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Exact versions for reproducible CI; pyproject's ranges stay open for users.
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check guard tests benchmarks
	$(BIN)/ruff format --check guard tests benchmarks

typecheck: venv
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m guard.toy.demo

bench: venv
	$(BIN)/python benchmarks/proxy_overhead.py

# Regenerate the gRPC stubs; tests/test_proto_stubs.py fails when they are stale.
proto: venv
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. \
		--grpc_python_out=. proto/guard/v1/guard.proto

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
