"""make's install step: it adds what is missing and never replaces the torch already installed, the one
torch_npu (or a CUDA or CPU build) is paired with. Driven with pip's dry run against stand-in packages in
a folder, with no registry and none of this machine's pip configuration."""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # creates a virtualenv and runs make and pip


def metadata(name, version, requires=()):
    return "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Requires-Dist: {r}\n" for r in requires)])


def installed(env, name, version, requires=()):
    """A stand-in for an installed distribution: its dist-info, which is all pip and importlib read."""
    site = next(env.glob("lib/python*/site-packages"))
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(metadata(name, version, requires))
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def wheel(folder, name, version, requires=()):
    """A stand-in for a wheel on an index: a zip holding only its dist-info."""
    folder.mkdir(exist_ok=True)
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{info}/METADATA", metadata(name, version, requires))
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


@pytest.fixture
def project(tmp_path):
    """A copy of the Makefile and requirements, a virtualenv with the runtime's other packages already
    in it, and a folder of wheels: today's torch and torchvision, and the torchvision of torch 2.9.0."""
    for name in ["Makefile", *(p.name for p in ROOT.glob("requirements*.txt"))]:
        shutil.copy(ROOT / name, tmp_path)
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", env], check=True, timeout=120)
    for name, version in [("numpy", "2.3.0"), ("tqdm", "4.67.0"), ("pillow", "11.0.0")]:
        installed(env, name, version)
    wheels = tmp_path / "wheels"
    wheel(wheels, "torch", "2.14.1")
    wheel(wheels, "torchvision", "0.29.1", ["torch==2.14.1"])
    wheel(wheels, "torchvision", "0.24.0", ["torch==2.9.0"])
    return tmp_path, env, wheels


def run_make_install(folder, env, wheels):
    """`make install` in folder with env active, pip answering from wheels alone in a dry run that
    reports to folder/report.json."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "MAKE", "CONDA"))}
    return subprocess.run(["make", "install"], cwd=folder, capture_output=True, text=True, timeout=300, env={
        **keep, "VIRTUAL_ENV": str(env), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheels), "PIP_DRY_RUN": "1", "PIP_REPORT": str(folder / "report.json"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def make_install(folder, env, wheels):
    """What `make install` would install, {name: version}."""
    proc = run_make_install(folder, env, wheels)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((folder / "report.json").read_text())
    return {i["metadata"]["name"]: i["metadata"]["version"] for i in report["install"]}


@pytest.mark.parametrize("torch_version", ["2.9.0", "2.9.0+cpu"])
def test_install_keeps_the_torch_that_torch_npu_needs_and_picks_the_torchvision_that_goes_with_it(
        project, torch_version):
    folder, env, wheels = project
    installed(env, "torch", torch_version)
    installed(env, "torch-npu", "2.9.0", [f"torch=={torch_version}"])
    assert make_install(folder, env, wheels) == {"torchvision": "0.24.0"}


@pytest.mark.parametrize("torch_version, torchvision", [("2.9.0", "0.24.0"), ("2.14.0+cpu", "0.29.0+cpu")])
def test_install_with_no_torchvision_for_the_kept_torch_ends_with_one_line_naming_the_one_to_install(
        project, torch_version, torchvision):
    folder, env, wheels = project
    installed(env, "torch", torch_version)
    (wheels / "torchvision-0.24.0-py3-none-any.whl").unlink()  # a mirror without it
    proc = run_make_install(folder, env, wheels)
    # pip's own lines stay above; make's `*** [...] Error 1`, which follows every failed step, is left out
    said = [line for line in proc.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert proc.returncode != 0 and "ResolutionImpossible" in proc.stderr and "Traceback" not in proc.stderr
    assert f"torch {torch_version}," in said[-1] and "kept" in said[-1], said[-1]
    assert f"pip install torchvision=={torchvision}" in said[-1], said[-1]
    assert ("--index-url https://download.pytorch.org/whl/cpu" in said[-1]) is torch_version.endswith("+cpu")


def test_install_in_a_fresh_environment_chooses_torch_and_torchvision_freely(project):
    folder, env, wheels = project
    assert make_install(folder, env, wheels) == {"torch": "2.14.1", "torchvision": "0.29.1"}


def test_every_install_step_of_make_asks_for_the_installed_torch_and_names_its_torchvision_if_pip_fails(project):
    folder, env, wheels = project
    installed(env, "torch", "2.9.0+cpu")
    proc = subprocess.run(["make", "-n", "install", "install-dev", "install-gui", "install-extra", "install-web"],
                          cwd=folder, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "VIRTUAL_ENV": str(env)})
    pip_lines = [line for line in proc.stdout.splitlines() if "pip install" in line]
    assert proc.returncode == 0 and len(pip_lines) == 5, proc.stdout + proc.stderr
    step = re.compile(r"pip install -r \S+ torch==2\.9\.0\+cpu \|\| .*NAME_TORCHVISION")  # the one-line ending
    assert all(step.search(line) for line in pip_lines), pip_lines
