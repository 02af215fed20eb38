"""`python -m ditforge` (also what torchrun launches)."""

import sys

from ditforge.cli import main

sys.exit(main())
