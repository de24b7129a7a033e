import sys

from harness.mocks.temperfs.cli import main

sys.exit(main())
