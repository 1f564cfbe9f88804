"""`python -m gridserve.head --host ... --grpc-port ... --state-dir ...`: run the head (see server.py)."""
import sys

from gridserve.head.server import main

if __name__ == "__main__":
    sys.exit(main())
