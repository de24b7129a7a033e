import sys

from harness.mocks.llm.cli import main

sys.exit(main())
