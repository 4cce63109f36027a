"""The folders are the architecture: the scheduler and the shared base never import torch."""
import subprocess
import sys

from services import ROOT

TORCH_FREE = ["pagedserve.scheduler_svc.service", "pagedserve.scheduler_svc.cli",
              "pagedserve.common.client", "pagedserve.common.cli",
              "pagedserve.common.up", "pagedserve.common.protocol", "pagedserve.benchmarks.cli"]


def test_scheduler_and_common_import_no_torch():
    code = (f"import sys\nfor m in {TORCH_FREE!r}: __import__(m)\n"
            "bad = sorted(m for m in ('torch', 'transformers', 'pagedserve.executor_svc')\n"
            "             if m in sys.modules)\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_cli_help_lists_commands_without_importing_torch():
    code = ("import sys\nfrom click.testing import CliRunner\n"
            "from pagedserve.common.cli import main\n"
            "out = CliRunner().invoke(main, ['--help']).output\n"
            "assert 'prepare-model' in out and 'scheduler' in out, out\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
