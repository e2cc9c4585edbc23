"""``python -m kvpress_evaluation``: the ``kvpress-eval`` command (also under ``torchrun ... -m kvpress_evaluation``)."""

from kvpress_evaluation.cli import main

raise SystemExit(main())
