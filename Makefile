# The two commands of the README. Each does all the set-up it needs (scripts/setup.sh is idempotent:
# it reuses .venv/ and the cached mmcv build).
PY := .venv/bin/python

.PHONY: demo test setup

setup:
	bash scripts/setup.sh

# The main job on a built-in default: DINO pretraining of a fundus (cfp) encoder on synthetic images.
demo: setup
	$(PY) pretrain/dino.py --modality cfp --config configs/pretrain/demo.yaml --output runs/demo

test: setup
	$(PY) -m pytest -q tests
