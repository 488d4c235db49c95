"""`python -m loralib.benchmark`: the benchmark's command line (`loralib.benchmark.cli`)."""

import sys

from loralib.benchmark.cli import main

sys.exit(main())
