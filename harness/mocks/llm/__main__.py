import sys

from harness.mocks.llm import cli
from harness.mocks.shared.cli import run_command

sys.exit(run_command("mock-llm", cli))
