import sys

from .cli import main

if __name__ == "__main__":  # not in the processes that train runs in parallel (they import this module)
    sys.exit(main())
