"""A replica, an agent and the CLI need only the core dependencies (pyproject.toml): plotting
is the `bench` extra's, so an install without it must start and answer `--help` without
importing it."""
import subprocess
import sys

import pytest

# Run in a fresh interpreter where matplotlib cannot be imported, as on a replica or an agent
# installed without the extra; then it must not have been loaded at all.
WITHOUT_MATPLOTLIB = """
import sys
class NoMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoMatplotlib())
"""


def run_without_matplotlib(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB + code],
                          capture_output=True, text=True, timeout=120)


def test_replica_agent_and_cli_code_paths_do_not_import_matplotlib():
    done = run_without_matplotlib(
        "import raftmesh.cli.main, raftmesh.api.server, raftmesh.agent.daemon\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["agent", "--help"]])
def test_raftmesh_help_does_not_import_matplotlib(argv):
    """`raftmesh --help` builds every subcommand's parser, the benchmarks' included."""
    done = run_without_matplotlib(
        "from raftmesh.cli.main import main\n"
        f"sys.argv = ['raftmesh', *{argv!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n")
    assert done.returncode == 0, done.stderr
    assert "usage: raftmesh" in done.stdout


def test_the_browser_driver_is_a_test_dependency_only():
    """selenium drives Debian's chromium in the console's browser tests; the console itself
    is static files, so nothing a replica, an agent or the CLI runs may import it."""
    import os
    import tomllib
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert not any(d.startswith("selenium") for d in project["dependencies"])
    assert any(d.startswith("selenium") for d in project["optional-dependencies"]["test"])
    done = subprocess.run([sys.executable, "-c", "import sys, raftmesh.cli.main, raftmesh.api.server, "
                           "raftmesh.agent.daemon\nassert 'selenium' not in sys.modules"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
