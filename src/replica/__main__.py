"""`python -m gridserve.replica --replica-id ID --model-config-json JSON ...`: run one replica process."""
import sys

from gridserve.replica.server import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
