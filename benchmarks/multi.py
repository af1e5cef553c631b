"""Several backends (moved to ``ihld.bench.multi``; ``ihld bench --workload multi-2,multi-4``).

    python benchmarks/multi.py --jobs 400 --speed 50 --kill     # multi-2, one backend killed
"""

import sys

from ihld.bench.multi import main

if __name__ == "__main__":
    sys.exit(main())
