"""Portable builds with runtime CPU dispatch: the extension is compiled for a baseline CPU unless
PTD_NATIVE=1 asks otherwise, its float32 kernels come in baseline / AVX2 / AVX-512 copies chosen at run time, it
reports which one runs here, every copy this CPU runs computes the same function, and no wide instruction leaks
outside the copy that owns it."""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ptd_sparse._extension as extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ISAS = ("baseline", "avx2", "avx512")
NEEDS = {"baseline": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx2", "fma", "avx512f", "avx512vl", "avx512bw",
                                                                 "avx512dq"}}

needs_extension = pytest.mark.skipif(extension.extension_problem() is not None,
                                     reason=str(extension.extension_problem()))
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def expected_isas() -> list[str]:
    """The kernel sets /proc/cpuinfo says this CPU runs, lowest first (what a portable x86-64 build must offer)."""
    flags = cpu_flags()
    return [isa for isa in ISAS if NEEDS[isa] <= flags]


def run_python(code_or_file: list[str], isa: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PTD_CPU_ISA"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    if isa is not None:
        env["PTD_CPU_ISA"] = isa
    return subprocess.run([sys.executable, *code_or_file], env=env, capture_output=True, text=True, timeout=300)


def portable_build() -> bool:
    return "-march=native" not in extension.build_flags() and "-mcpu=native" not in extension.build_flags()


# ---- the built extension

@needs_extension
@pytest.mark.skipif(not (IS_X86 and Path("/proc/cpuinfo").exists()), reason="reads x86 flags from /proc/cpuinfo")
def test_reported_kernel_set_is_the_best_this_cpu_supports():
    done = run_python(["-c", "import ptd_sparse._extension as e; print(e.cpu_kernel_isa()); "
                             "print(' '.join(e.cpu_kernel_isas()))"], isa=None)
    assert done.returncode == 0, done.stderr
    used, available = done.stdout.split("\n")[:2]
    expected = expected_isas()
    assert available.split() == expected, f"/proc/cpuinfo flags allow {expected}, the extension offers {available}"
    assert used == expected[-1]


@needs_extension
def test_portable_build_assumes_nothing_of_this_cpu():
    assert extension.extension_problem() is None
    if portable_build():
        assert not re.search(r"-march=(native|x86-64-v[34]|skylake|znver|icelake|sapphire)", extension.build_flags())
    from ptd_sparse import _C
    assert list(_C.missing_cpu_features()) == []


@needs_extension
@pytest.mark.parametrize("isa", ISAS)
def test_every_kernel_set_matches_the_oracles(isa):
    if isa not in extension.cpu_kernel_isas():
        pytest.skip(f"this CPU or build cannot run the {isa} kernels (available: {extension.cpu_kernel_isas()})")
    done = run_python([str(HERE / "cpu_isa_worker.py"), isa], isa=isa)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(f"{isa} ok")


@needs_extension
def test_forcing_a_kernel_set_the_cpu_lacks_is_an_error_naming_it():
    missing = [isa for isa in ISAS if isa not in extension.cpu_kernel_isas()]
    cases = [("sse9", "PTD_CPU_ISA must be one of baseline, avx2, avx512")]
    if missing:
        isa = missing[-1]
        lacking = sorted(NEEDS[isa] - cpu_flags()) if IS_X86 else []
        cases.append((isa, f"PTD_CPU_ISA={isa} asks for"))
    for isa, message in cases:
        done = run_python(["-c", "import ptd_sparse._extension as e; e.cpu_kernel_isa()"], isa=isa)
        assert done.returncode != 0 and "ValueError" in done.stderr and message in done.stderr, done.stderr
        if isa != "sse9" and IS_X86 and lacking:
            assert lacking[0] in done.stderr, done.stderr
    # The operators report the same error instead of running another kernel set.
    done = run_python(["-c", "import torch, ptd_sparse; ptd_sparse.kd_loss(torch.randn(2, 3), torch.randn(2, 3), "
                             "backend='cpu')"], isa="sse9")
    assert done.returncode != 0 and "PTD_CPU_ISA must be one of" in done.stderr, done.stderr


def test_stale_check_refuses_a_build_for_missing_cpu_features():
    class NativeBuildElsewhere:
        @staticmethod
        def torch_version():
            import torch
            return torch.__version__

        @staticmethod
        def missing_cpu_features():
            return ["avx512f", "avx512bw"]

        @staticmethod
        def build_flags():
            return "-O3 -march=native"

    problem = extension._problem_of(NativeBuildElsewhere)
    assert problem is not None and "avx512f, avx512bw" in problem and "-march=native" in problem
    assert "PTD_NATIVE=1" in problem


@needs_extension
@pytest.mark.skipif(not IS_X86 or shutil.which("objdump") is None, reason="disassembles x86-64 code with objdump")
def test_wide_instructions_only_in_their_kernel_copies():
    """Every function of the built extension that uses a ymm register belongs to the AVX2 or AVX-512 copy, every one
    that uses zmm to the AVX-512 copy: the baseline code (and whatever the linker merged into it) runs on any x86-64
    CPU. This is what fails when an inline function or template instance compiled under a target pragma escapes its
    namespace."""
    if not portable_build() or "-march=x86-64-v2" not in extension.build_flags():
        pytest.skip(f"the build's baseline is not x86-64-v2 ({extension.build_flags()})")
    from ptd_sparse import _C
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True,
                             text=True, check=True).stdout
    function, ymm_outside, zmm_outside, copies = "", set(), set(), {"avx2": 0, "avx512": 0}
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line
            continue
        if "%ymm" in line and "isa_avx2::" not in function and "isa_avx512::" not in function:
            ymm_outside.add(function)
        if "%zmm" in line:
            if "isa_avx512::" not in function:
                zmm_outside.add(function)
            copies["avx512"] += 1
        if "%ymm" in line and "isa_avx2::" in function:
            copies["avx2"] += 1
    assert not ymm_outside, f"ymm instructions outside the AVX2/AVX-512 copies: {sorted(ymm_outside)[:5]}"
    assert not zmm_outside, f"zmm instructions outside the AVX-512 copy: {sorted(zmm_outside)[:5]}"
    assert copies["avx2"] > 0 and copies["avx512"] > 0, f"a kernel copy lacks its wide instructions: {copies}"


# ---- setup.py's flags

def load_setup(monkeypatch, machine: str = "x86_64", **env):
    for name in ("PTD_NATIVE", "PTD_CPU_ARCH", "PTD_SANITIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PTD_SKIP_CUDA_BUILD", "1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    spec = importlib.util.spec_from_file_location("ptd_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() itself does not run
    return module.extension()


def test_setup_is_portable_unless_ptd_native(monkeypatch):
    ext = load_setup(monkeypatch)
    flags = ext.extra_compile_args["cxx"]
    assert "-march=native" not in flags and "-march=x86-64-v2" in flags
    assert any('PTD_BUILD_FLAGS="-O3 -march=x86-64-v2"' in f for f in flags)
    assert {"csrc/cpu/isa/kernels_avx2.cpp", "csrc/cpu/isa/kernels_avx512.cpp", "csrc/cpu/isa/dispatch.cpp"} <= \
        set(ext.sources)

    flags = load_setup(monkeypatch, PTD_NATIVE="1").extra_compile_args["cxx"]
    assert "-march=native" in flags and "-march=x86-64-v2" not in flags
    flags = load_setup(monkeypatch, PTD_CPU_ARCH="x86-64-v3").extra_compile_args["cxx"]
    assert "-march=x86-64-v3" in flags and "-march=native" not in flags
    with pytest.raises(ValueError, match="PTD_NATIVE=1 and PTD_CPU_ARCH=x86-64-v3"):
        load_setup(monkeypatch, PTD_NATIVE="1", PTD_CPU_ARCH="x86-64-v3")
    with pytest.raises(ValueError, match="PTD_NATIVE must be 0 or 1"):
        load_setup(monkeypatch, PTD_NATIVE="yes")


def test_setup_passes_no_x86_flag_on_arm(monkeypatch):
    flags = load_setup(monkeypatch, machine="aarch64").extra_compile_args["cxx"]
    assert not [f for f in flags if f.startswith(("-march", "-mcpu", "-mavx", "-mfma"))], flags
    flags = load_setup(monkeypatch, machine="aarch64", PTD_NATIVE="1").extra_compile_args["cxx"]
    assert "-mcpu=native" in flags and "-march=native" not in flags


def test_setup_sh_rebuilds_when_the_build_flags_change(tmp_path):
    """scripts/setup.sh's build stamp (its build_stamp function, run here as the script runs it) changes with every
    variable that changes the compiled code, so switching PTD_NATIVE on or off rebuilds the extension."""
    # A stand-in venv whose python reports a fixed torch version: the stamp's torch part is not under test here.
    (tmp_path / "bin").mkdir()
    fake_python = tmp_path / "bin" / "python"
    fake_python.write_text("#!/bin/sh\necho 2.0.0-test\n")
    fake_python.chmod(0o755)

    def stamp(**env) -> str:
        clean = {k: v for k, v in os.environ.items() if k not in ("PTD_NATIVE", "PTD_CPU_ARCH", "PTD_SKIP_CUDA_BUILD")}
        clean.update(env, VENV=str(tmp_path))
        script = 'eval "$(sed -n \'/^build_stamp() {/,/^}/p\' scripts/setup.sh)"; build_stamp'
        done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and len(done.stdout.strip()) == 64, done.stderr
        return done.stdout.strip()

    portable = stamp()
    assert stamp() == portable  # deterministic
    assert stamp(PTD_NATIVE="1") != portable
    assert stamp(PTD_CPU_ARCH="x86-64-v3") != portable
    assert stamp(PTD_NATIVE="0") == portable  # the default spelled out is the default
