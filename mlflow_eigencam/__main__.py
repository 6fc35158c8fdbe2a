"""``python -m mlflow_eigencam``: the same as the ``mlflow-eigencam`` command."""

import sys

from .cli import main

sys.exit(main())
