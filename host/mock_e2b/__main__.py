import sys

from host.mock_e2b.cli import main

sys.exit(main())
