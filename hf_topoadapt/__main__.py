"""`python -m hf_topoadapt` runs the `hf-topoadapt` command line."""

import sys

from .cli import main

sys.exit(main())
