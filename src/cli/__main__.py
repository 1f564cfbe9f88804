"""`python -m gridserve.cli`: the same as the `gridserve` command."""
import sys

from gridserve.cli.main import main

sys.exit(main())
