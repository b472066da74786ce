"""`python -m raylt` is the `raylt` command."""

import sys

from raylt.cli import main

sys.exit(main())
