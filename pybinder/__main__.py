"""``python -m pybinder`` runs the command line (see :mod:`pybinder.cli`)."""

import sys

from pybinder.cli import main

sys.exit(main())
