"""`python -m ktinject` is the `ktinject` command."""

import sys

from ktinject.cli import main

sys.exit(main())
