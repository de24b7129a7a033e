import sys

from harness.mocks.e2b.cli import main

sys.exit(main())
