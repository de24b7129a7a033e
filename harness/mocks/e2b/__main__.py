import sys

from harness.mocks.e2b import cli
from harness.mocks.shared.cli import run_command

sys.exit(run_command("mock-e2b", cli))
