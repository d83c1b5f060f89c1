# The commands the README names. Each does its own set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: all test security lint typecheck unit demo demo-tflite mosquitto clean bench bench-rollout bench-scale bench-storm bench-waves bench-ingest bench-scoring bench-scoring-stages

all: test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Outpost needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

mosquitto:
	@deploy/scripts/ensure-mosquitto.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

## make test: lint, type-check (strict), import rules and every test against real parts.
test: $(STAMP) mosquitto lint typecheck
	$(BIN)/pytest -q

## make security: the adversarial suite alone (also part of make test), printing the figures
## SECURITY.md reports: fuzz reason tables, the ACL matrix, the API route matrix, schemathesis.
SECURITY_TESTS := tests/security tests/e2e/test_acl_matrix.py tests/e2e/test_tls_broker.py \
	tests/hub/test_api_auth.py tests/hub/test_audit.py tests/hub/test_openapi_fuzz.py \
	tests/hub/test_broker_access.py tests/hub/test_enrolment.py tests/hub/test_device_ca.py
security: $(STAMP) mosquitto
	$(BIN)/pytest -q -s $(SECURITY_TESTS)

## make demo: hub + its Mosquitto, three agents, the example model deployed and scored.
demo: $(STAMP) mosquitto
	$(BIN)/python -m examples.demo

## make demo-tflite: the same with the TFLite example (LiteRT on the devices).
demo-tflite: $(STAMP) mosquitto
	$(BIN)/python -m examples.demo --framework tflite

## make bench-rollout / bench-scale / bench-storm / bench-waves / bench-ingest / bench-scoring: one benchmark at the issue's
## sizes, printed with its floor and ratio and appended to bench/RESULTS.md (see bench/README.md).
bench-rollout: $(STAMP) mosquitto
	$(BIN)/python -m bench.rollout

bench-scale: $(STAMP) mosquitto
	$(BIN)/python -m bench.scale

bench-storm: $(STAMP) mosquitto
	$(BIN)/python -m bench.storm

bench-waves: $(STAMP) mosquitto
	$(BIN)/python -m bench.waves

## INGEST_ARGS="--database-url postgresql://postgres@127.0.0.1:5432/test" also runs it on PostgreSQL.
INGEST_ARGS ?=
bench-ingest: $(STAMP) mosquitto
	$(BIN)/python -m bench.ingest $(INGEST_ARGS)

## make bench: all five, one after the other (the machine is small: never at once).
## bench-scoring: /score per runtime (ONNX Runtime, LiteRT, score.py) against a bare server making
## the raw call, and the agent's memory against a bare session.
bench-scoring: $(STAMP) mosquitto
	$(BIN)/python -m bench.scoring

## bench-scoring-stages: where a scoring call's time goes: the endpoint cut at each stage (HTTP,
## checks, model, answer, telemetry) against the same floors, for LiteRT and ONNX Runtime.
bench-scoring-stages: $(STAMP)
	$(BIN)/python -m bench.scoring_stages --runtime tflite
	$(BIN)/python -m bench.scoring_stages --runtime onnx

bench: bench-rollout bench-scale bench-storm bench-waves bench-ingest bench-scoring

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache examples/build
