"""`python -m gridserve.replica --replica-id ID --model-config BASE64 ...`: run one replica process (the scheduler
starts it; --model-config is base64 of a serialized gridserve.v1.ModelConfig)."""
import sys

from gridserve.replica.server import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
