"""deploy/install.sh: packages that come with a service (etcd-server, haproxy) are installed
without the service starting, so nothing has to be stopped or disabled afterwards, and only
the options for tests and benchmarks bring them and their extras."""
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "deploy", "install.sh")


def bash(code: str) -> subprocess.CompletedProcess:
    """`code` run with install.sh's functions defined (sourcing it runs nothing)."""
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {SCRIPT}\n{code}"],
                          capture_output=True, text=True, timeout=60)


def fake_apt_get(log, fails: bool = False) -> str:
    """apt-get as a shell function: `install` records what the policy says about starting
    etcd at that moment (Debian's maintainer scripts ask the same through invoke-rc.d)."""
    return f"""
apt-get() {{
  if [ "$1" = install ]; then
    if [ -e "$policy_rc_d" ]; then "$policy_rc_d" etcd start && s=0 || s=$?; echo "policy $s" >>{log}
    else echo "no policy" >>{log}; fi
    {"return 1" if fails else ""}
  fi
}}
"""


def test_a_service_package_installs_under_a_temporary_policy_that_forbids_starting_it(tmp_path):
    guard, log = tmp_path / "policy-rc.d", tmp_path / "log"
    done = bash(f"policy_rc_d={guard}\n{fake_apt_get(log)}\n"
                "apt_install_without_starting_services etcd-server")
    assert done.returncode == 0, done.stderr
    assert log.read_text() == "policy 101\n"  # 101: action forbidden
    assert not guard.exists()


def test_the_temporary_policy_goes_also_when_the_install_fails(tmp_path):
    guard, log = tmp_path / "policy-rc.d", tmp_path / "log"
    done = bash(f"policy_rc_d={guard}\n{fake_apt_get(log, fails=True)}\n"
                "apt_install_without_starting_services etcd-server")
    assert done.returncode != 0 and log.read_text() == "policy 101\n"
    assert not guard.exists()


def test_an_existing_policy_is_left_in_charge(tmp_path):
    guard, log = tmp_path / "policy-rc.d", tmp_path / "log"
    guard.write_text("#!/bin/sh\nexit 0\n")
    guard.chmod(0o755)
    done = bash(f"policy_rc_d={guard}\n{fake_apt_get(log)}\n"
                "apt_install_without_starting_services etcd-server")
    assert done.returncode == 0, done.stderr
    assert log.read_text() == "policy 0\n" and guard.read_text() == "#!/bin/sh\nexit 0\n"


@pytest.mark.parametrize("options, extra", [([], ""), (["--bench"], "[bench]"),
                                            (["--tests"], "[test]"), (["--bench", "--tests"], "[test]")])
def test_only_the_test_and_bench_options_install_their_extras(tmp_path, options, extra):
    venv = tmp_path / "venv"
    done = subprocess.run(["bash", SCRIPT, "--dry-run", *options], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, RAFTMESH_VENV=str(venv), RAFTMESH_LINK=""))
    assert done.returncode == 0, done.stderr
    pip = [line for line in done.stdout.splitlines() if " -m pip install " in line]
    assert pip == [f"would run: {venv}/bin/python -m pip install -q --disable-pip-version-check "
                   f"-e .{extra}"]
    npm = [line for line in done.stdout.splitlines() if "npm install" in line]  # the console tests' axe-core
    assert npm == ([f"would run: npm install --silent --no-save --prefix {venv}/node axe-core@4"]
                   if extra == "[test]" else [])
    assert not venv.exists()


def test_an_unknown_option_is_refused_by_name():
    done = subprocess.run(["bash", SCRIPT, "--test"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown option --test" in done.stderr


def test_a_built_package_carries_the_web_console(tmp_path):
    """The console is package data (pyproject.toml): a non-editable install must serve it too."""
    root = os.path.join(os.path.dirname(__file__), "..")
    done = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['setup.py', '-q', 'build_py', "
                           f"'--build-lib', {str(tmp_path)!r}]; from setuptools import setup; setup()"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    source = os.path.join(root, "api", "console", "static")
    built = tmp_path / "raftmesh" / "api" / "console" / "static"
    assert sorted(os.listdir(built)) == sorted(os.listdir(source))
    assert "index.html" in os.listdir(built) and (built / "app.js").stat().st_size > 0
