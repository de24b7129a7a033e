import sys

from host.mock_llm.cli import main

sys.exit(main())
