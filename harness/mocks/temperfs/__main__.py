import sys

from harness.mocks.shared.cli import run_command
from harness.mocks.temperfs import cli

sys.exit(run_command("mock-temperfs", cli))
