"""Labelling layer without real QM codes: registry, external adapter, timeouts, secrets, retry policy,
fault injection. The "external code" here is a small Python script that labels with EMT."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from alforge.labelling.base import FailureClass, LabelFailure
from alforge.labelling.espresso import pick_pbe_pseudopotential
from alforge.labelling.external import ExternalLabeller, fill_template, structure_fields
from alforge.labelling.faulty import FaultyLabeller
from alforge.labelling.policy import (
    AttemptRecord,
    GiveUp,
    Quarantine,
    Retry,
    RetryPolicy,
    label_with_policy,
)
from alforge.labelling.registry import available, make_labeller
from alforge.labelling.runner import TAIL_LINES, structure_digest

PROVENANCE_KEYS = {"code", "version", "params_hash", "wall_time", "host"}

# A stand-in for a DFT code: reads an extxyz input, writes an extxyz output with EMT results.
FAKE_CODE = """
import os, sys
from ase.io import read, write
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
atoms = read(sys.argv[1])
atoms.calc = EMT()
res = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
atoms.calc = SinglePointCalculator(atoms, **res)
write(sys.argv[2], atoms, format="extxyz")
print("fake code finished", os.environ.get("FAKE_BANNER", ""))
"""


def _cu() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=3)
    return atoms


@pytest.fixture()
def fake_code(tmp_path: Path) -> Path:
    path = tmp_path / "fake_code.py"
    path.write_text(FAKE_CODE)
    return path


def _external(fake_code: Path, scratch: Path, **kwargs) -> ExternalLabeller:
    defaults = dict(
        command=[sys.executable, str(fake_code), "{input}", "{output}"],
        input_file="in.xyz", input_format="extxyz", output_file="out.xyz", output_format="extxyz",
        scratch_root=scratch, name="fake",
    )
    return ExternalLabeller(**{**defaults, **kwargs})


# -- registry --------------------------------------------------------------------------------------
def test_registry_builds_ase_labellers_with_provenance():
    labeller = make_labeller("emt", max_force=100.0)
    label = labeller.label(_cu())
    ref = _cu()
    ref.calc = EMT()
    assert label.energy == pytest.approx(ref.get_potential_energy())
    assert PROVENANCE_KEYS <= set(label.metadata)
    assert label.metadata["code"] == "emt" and label.metadata["version"].startswith("ase ")
    assert make_labeller("ase.calculators.emt:EMT").label(_cu()).energy == pytest.approx(label.energy)


def test_registry_errors_name_spec_and_options():
    with pytest.raises(ValueError, match=r"unknown labeller 'vasp'.*espresso.*faulty.*xtb"):
        make_labeller("vasp")
    with pytest.raises(TypeError, match="labeller 'xtb'"):
        make_labeller("xtb", no_such_option=1)
    with pytest.raises(ValueError, match="no_such_module"):
        make_labeller("no_such_module:factory")
    assert {"emt", "lj", "espresso", "cp2k", "xtb", "pyscf", "external", "faulty", "lookup"} == set(available())


def test_constructor_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"ecutwfc"):
        make_labeller("espresso", input_data={"control": {}})
    with pytest.raises(ValueError, match="at most one of kspacing"):
        make_labeller("espresso", input_data={"ecutwfc": 20}, kspacing=0.3, kpts=(2, 2, 2))
    with pytest.raises(ValueError, match="MAX_SCF"):
        make_labeller("cp2k", inp="&FORCE_EVAL\n&DFT\n&SCF\nMAX_SCF 10\n&END SCF\n&END DFT\n&END FORCE_EVAL")
    with pytest.raises(ValueError, match="gfn"):
        make_labeller("xtb", gfn=3)


def test_pbe_pseudopotential_pick(tmp_path):
    for name in ("Si.pbe-rrkj.UPF", "Si.pbe-nl-rrkjus_psl.1.0.0.UPF", "Si.pz-vbc.UPF", "Si.rel-pbe-rrkj.UPF",
                 "Co.pbe-nd-rrkjus.UPF", "C.pbesol-n-kjpaw_psl.0.1.UPF", "Cu.pbe-kjpaw.UPF"):
        (tmp_path / name).write_text("")
    assert pick_pbe_pseudopotential("Si", tmp_path) == "Si.pbe-rrkj.UPF"
    assert pick_pbe_pseudopotential("Cu", tmp_path) == "Cu.pbe-kjpaw.UPF"
    with pytest.raises(LabelFailure, match="no PBE pseudopotential for element 'C'"):
        pick_pbe_pseudopotential("C", tmp_path)  # neither Co/Cu nor PBEsol


def test_espresso_input_options_reach_pw_input(tmp_path):
    """With ``true`` standing in for pw.x, the written input can be inspected without QE installed."""
    (tmp_path / "Cu.pbe-kjpaw.UPF").write_text("")
    labeller = make_labeller("espresso", input_data={"ecutwfc": 30, "electrons": {"mixing_beta": 0.3}},
                             kptdensity=2.0, pseudo_dir=tmp_path, command=["true"], scratch_root=tmp_path / "s")
    with pytest.raises(LabelFailure) as info:
        labeller.label(_cu())
    assert info.value.failure_class is FailureClass.CRASH  # no output to parse
    pwi = (Path(info.value.metadata["scratch"]) / "espresso.pwi").read_text()
    assert "K_POINTS automatic\n4 4 4" in pwi
    for line in ("ecutwfc          = 30", "mixing_beta      = 0.3", "tprnfor          = .true.",
                 "Cu 63.546 Cu.pbe-kjpaw.UPF", f"pseudo_dir       = '{tmp_path}'"):
        assert line in pwi, line


# -- external adapter ------------------------------------------------------------------------------
def test_external_adapter_matches_direct_calculator_and_cleans_up(fake_code, tmp_path):
    scratch = tmp_path / "scratch"
    labeller = _external(fake_code, scratch, version="fake 1.0")
    atoms = _cu()
    label = labeller.label(atoms)
    atoms.calc = EMT()
    # extxyz writes positions with 8 decimals, hence 1e-6 rather than bit-equality
    assert label.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(label.forces, atoms.get_forces(), atol=1e-6)
    np.testing.assert_allclose(label.stress, atoms.get_stress(voigt=False), atol=1e-6)
    assert PROVENANCE_KEYS <= set(label.metadata) and label.metadata["version"] == "fake 1.0"
    assert label.metadata["code"] == "fake"
    assert list(scratch.iterdir()) == []  # successful jobs leave nothing behind


def test_external_callable_reader_and_stdin(fake_code, tmp_path, monkeypatch):
    (tmp_path / "my_reader.py").write_text(
        "import numpy as np\n"
        "def read(path, atoms):\n"
        "    n = len(atoms)\n"
        "    return float(path.read_text().split()[0]), np.zeros((n, 3)), [1, 2, 3, 0, 0, 0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    labeller = ExternalLabeller(
        [sys.executable, "-c", "import sys; n = sys.stdin.read().count('Cu'); print(-1.5 * n)"],
        input_format="extxyz", stdin=True, output_format="my_reader:read", scratch_root=tmp_path / "s",
    )
    label = labeller.label(_cu())
    assert label.energy == pytest.approx(-6.0)  # 4 Cu atoms read from stdin
    np.testing.assert_allclose(np.diag(label.stress), [1, 2, 3])


def test_template_placeholders(tmp_path):
    atoms = Atoms("SiO", positions=[[0, 0, 0], [1.5, 0, 0]], cell=np.eye(3) * 4, pbc=True)
    fields = structure_fields(atoms)
    text = fill_template("{natoms} {ntypes} {elements}\n{species_positions}\n{{natoms}} {x}", {**fields, "x": "7"}, "t")
    assert text.splitlines() == ["2 2 Si O", "Si 0.0000000000 0.0000000000 0.0000000000",
                                 "O 1.5000000000 0.0000000000 0.0000000000", "{natoms} 7"]
    template = tmp_path / "bad.in"
    template.write_text("nat={natoms}\n{positons}\n")
    with pytest.raises(ValueError, match=r"bad\.in: unknown placeholder \{positons\}"):
        ExternalLabeller(["true"], input_template=template, output_format="extxyz")


def test_command_placeholders_only_as_whole_arguments():
    common = dict(input_format="extxyz", output_format="extxyz")
    with pytest.raises(ValueError, match="whole arguments"):
        ExternalLabeller(["code", "-in={input}"], **common)
    with pytest.raises(ValueError, match="unknown placeholder"):
        ExternalLabeller(["code", "{inptu}"], **common)
    ExternalLabeller(["python", "-c", "print({'a': 1})", "{input}"], **common)  # literal braces are fine


def test_not_converged_pattern_overrides_numbers(fake_code, tmp_path):
    labeller = _external(fake_code, tmp_path / "s", not_converged_pattern=r"WARNING: SCF not converged",
                         env={"FAKE_BANNER": "WARNING: SCF not converged"})
    with pytest.raises(LabelFailure) as info:
        labeller.label(_cu())
    assert info.value.failure_class is FailureClass.SCF_NOT_CONVERGED
    assert "SCF not converged" in info.value.output_tail


def test_nonzero_exit_is_crash_with_tail_and_kept_scratch(tmp_path):
    script = "import sys\nfor i in range(100): print('line', i)\nsys.exit(3)"
    labeller = ExternalLabeller([sys.executable, "-c", script], input_format="extxyz", output_format="extxyz",
                                scratch_root=tmp_path / "s")
    with pytest.raises(LabelFailure) as info:
        labeller.label(_cu())
    failure = info.value
    assert failure.failure_class is FailureClass.CRASH and "status 3" in failure.message
    tail_lines = [ln for ln in failure.output_tail.splitlines() if ln.startswith("line")]
    assert tail_lines[-1] == "line 99" and len(tail_lines) == TAIL_LINES
    kept = Path(failure.metadata["scratch"])
    assert kept.is_dir() and (kept / "input").is_file() and str(kept) in failure.message
    assert failure.metadata["structure"] == structure_digest(_cu())

    labeller.keep_failed = False
    with pytest.raises(LabelFailure) as info:
        labeller.label(_cu())
    assert info.value.metadata["scratch"] is None
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [kept.name]


def test_timeout_kills_the_whole_process_group(tmp_path):
    # The "code" starts a grandchild and both sleep; a timeout must take down both.
    script = (
        "import subprocess, time\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        "open('grandchild.pid', 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    labeller = ExternalLabeller([sys.executable, "-c", script], input_format="extxyz", output_format="extxyz",
                                timeout=1.0, scratch_root=tmp_path / "s")
    start = time.perf_counter()
    with pytest.raises(LabelFailure) as info:
        labeller.label(_cu())
    assert time.perf_counter() - start < 10
    assert info.value.failure_class is FailureClass.TIMEOUT
    pid = int((Path(info.value.metadata["scratch"]) / "grandchild.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_sleep_command_times_out(tmp_path):
    labeller = ExternalLabeller(["sleep", "30"], input_format="extxyz", output_format="extxyz", timeout=0.5,
                                scratch_root=tmp_path / "s", keep_failed=False)
    start = time.perf_counter()
    with pytest.raises(LabelFailure) as info:
        labeller.label(_cu())
    assert info.value.failure_class is FailureClass.TIMEOUT
    assert time.perf_counter() - start < 5


def _alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (a container's init may be slow to reap)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


SECRET = "hunter2-licence-7f3a"


def test_secrets_never_reach_tails_messages_or_metadata(fake_code, tmp_path, monkeypatch):
    monkeypatch.setenv("ALFORGE_TEST_SECRET", SECRET)
    env = {"LM_LICENSE_FILE": "$env:ALFORGE_TEST_SECRET", "FAKE_BANNER": "$env:ALFORGE_TEST_SECRET"}
    # Success: the code sees the value (and prints it), the label does not carry it.
    labeller = _external(fake_code, tmp_path / "s", env=env)
    label = labeller.label(_cu())
    assert SECRET not in json.dumps(label.metadata, default=str)
    assert SECRET not in json.dumps(labeller.provenance(), default=str)
    # Failure: output echoing the secret on stdout and stderr is scrubbed, in the message too.
    script = ("import os, sys; s = os.environ['LM_LICENSE_FILE']; print('licence', s); "
              "print('bad licence', s, file=sys.stderr); sys.exit('licence ' + s + ' rejected')")
    failing = ExternalLabeller([sys.executable, "-c", script], input_format="extxyz", output_format="extxyz",
                               env=env, scratch_root=tmp_path / "s")
    with pytest.raises(LabelFailure) as info:
        failing.label(_cu())
    failure = info.value
    assert "licence ***" in failure.output_tail
    for text in (failure.output_tail, failure.message, str(failure), json.dumps(failure.metadata, default=str)):
        assert SECRET not in text
    records = label_with_policy(lambda **kw: failing, _cu(), RetryPolicy())[1]
    assert SECRET not in json.dumps([r.to_dict() for r in records], default=str)


def test_missing_env_reference_is_a_named_crash(fake_code, tmp_path, monkeypatch):
    monkeypatch.delenv("ALFORGE_NOT_SET", raising=False)
    labeller = _external(fake_code, tmp_path / "s", env={"TOKEN": "$env:ALFORGE_NOT_SET"})
    with pytest.raises(LabelFailure, match=r"'ALFORGE_NOT_SET' referenced by env\['TOKEN'\]") as info:
        labeller.label(_cu())
    assert info.value.failure_class is FailureClass.CRASH


# -- retry policy ------------------------------------------------------------------------------------
C, T, S, N, IMP = (FailureClass.CRASH, FailureClass.TIMEOUT, FailureClass.SCF_NOT_CONVERGED,
                   FailureClass.NON_FINITE, FailureClass.IMPLAUSIBLE)


@pytest.mark.parametrize(
    ("failure", "history", "expected"),
    [
        (C, [], GiveUp),
        (T, [], Retry),
        (T, [T], GiveUp),
        (S, [], Retry),
        (S, [S], GiveUp),
        (N, [], GiveUp),
        (IMP, [], GiveUp),
        (T, [S, S], Quarantine),
        (C, [T, T], Quarantine),
    ],
)
def test_default_policy_decisions(failure, history, expected):
    decision = RetryPolicy.for_labeller("cp2k").decide(failure, history, {"max_scf": 50})
    assert isinstance(decision, expected)


def test_scf_hooks_adjust_each_code():
    scf = FailureClass.SCF_NOT_CONVERGED
    qe = RetryPolicy.for_labeller("espresso").decide(scf, [], {"input_data": {"ecutwfc": 20, "mixing_beta": 0.4}})
    assert qe.kwargs_update["input_data"]["electrons"] == {"electron_maxstep": 200, "mixing_beta": 0.2}
    assert qe.kwargs_update["input_data"]["system"] == {"ecutwfc": 20}
    assert RetryPolicy.for_labeller("cp2k").decide(scf, [], {}).kwargs_update == {"max_scf": 100, "mixing_alpha": 0.2}
    assert RetryPolicy.for_labeller("pyscf").decide(scf, [], {"max_cycle": 30}).kwargs_update == {
        "max_cycle": 60, "newton": True}
    assert RetryPolicy.for_labeller("xtb").decide(scf, [], {}).kwargs_update == {"iterations": 500}
    # A code without a hook has nothing to change, so the same input is not run again.
    assert isinstance(RetryPolicy.for_labeller("external").decide(scf, [], {}), GiveUp)
    # History may be given as stored attempt records.
    record = AttemptRecord(1, {}, 1.0, scf)
    assert isinstance(RetryPolicy.for_labeller("xtb").decide(scf, [record], {}), GiveUp)


def test_label_with_policy_heals_scf_with_more_iterations():
    factory = functools.partial(make_labeller, "faulty")
    atoms = _cu()
    atoms.info["fault"] = "scf"
    label, records = label_with_policy(factory, atoms, RetryPolicy.for_labeller("faulty"),
                                       {"inner": "emt", "scf_iterations_needed": 100})
    assert label is not None and np.isfinite(label.energy)
    assert [r.failure_class for r in records] == [FailureClass.SCF_NOT_CONVERGED, None]
    assert records[0].decision == "retry" and records[1].kwargs["scf_iterations"] == 100
    assert records[0].output_tail and records[0].wall_time >= 0
    assert PROVENANCE_KEYS <= set(records[1].metadata) and PROVENANCE_KEYS <= set(records[0].metadata)
    json.dumps([r.to_dict() for r in records], default=str)  # storable


@pytest.mark.parametrize(
    ("fault", "classes", "decision"),
    [
        ("crash", [C], "give_up"),
        ("hang", [T, T], "give_up"),
        ("nan", [N], "give_up"),
        ("scf", [S, S], "give_up"),
    ],
)
def test_label_with_policy_records_every_attempt(fault, classes, decision):
    factory = functools.partial(make_labeller, "faulty")
    atoms = _cu()
    atoms.info["fault"] = fault
    label, records = label_with_policy(factory, atoms, RetryPolicy.for_labeller("faulty"),
                                       {"inner": "emt", "timeout": 0.3, "hang_seconds": 30})
    assert label is None
    assert [r.failure_class for r in records] == classes
    assert records[-1].decision == decision


def test_quarantine_after_earlier_failures():
    atoms = _cu()
    atoms.info["fault"] = "crash"
    label, records = label_with_policy(functools.partial(make_labeller, "faulty"), atoms, RetryPolicy(),
                                       previous_failures=["timeout", "timeout"])
    assert label is None and records[-1].decision == "quarantine"


def test_unexpected_exception_is_recorded_as_crash():
    class Broken(FaultyLabeller):
        def label(self, atoms):
            raise KeyError("bug")

    label, records = label_with_policy(lambda **kw: Broken(), _cu(), RetryPolicy())
    assert label is None and records[0].failure_class is FailureClass.CRASH
    assert "KeyError" in records[0].message and "Traceback" in records[0].output_tail


# -- fault injection ---------------------------------------------------------------------------------
def test_faulty_modes_and_selection_rules():
    clean = _cu()
    digest = int(structure_digest(clean), 16)
    hit = [{"mode": "nan", "modulo": 7, "remainder": digest % 7}]
    miss = [{"mode": "nan", "modulo": 7, "remainder": (digest + 1) % 7}]
    assert FaultyLabeller(rules=hit).fault_for(clean) == "nan"
    assert FaultyLabeller(rules=miss).fault_for(clean) is None
    label = FaultyLabeller(rules=miss).label(clean)
    assert label.metadata["code"] == "faulty[emt]" and label.metadata["injected_fault"] is None

    expected = {"crash": C, "scf": S, "nan": N, "hang": T}
    for mode, failure_class in expected.items():
        tagged = _cu()
        tagged.info["fault"] = mode
        with pytest.raises(LabelFailure) as info:
            FaultyLabeller(inner="emt", timeout=0.2, hang_seconds=30).label(tagged)
        assert info.value.failure_class is failure_class, mode
        assert info.value.metadata["injected_fault"] == mode
    # Without a timeout a hang is merely slow, and then labels.
    slow = _cu()
    slow.info["fault"] = "hang"
    assert np.isfinite(FaultyLabeller(hang_seconds=0.1).label(slow).energy)
    with pytest.raises(ValueError, match=r"rules\[0\]"):
        FaultyLabeller(rules=[{"mode": "explode", "modulo": 2}])


def test_implausible_forces_are_classified():
    atoms = molecule("H2")
    atoms.positions[1] = atoms.positions[0] + [0.05, 0, 0]
    atoms.center(vacuum=5.0)
    atoms.pbc = False
    with pytest.raises(LabelFailure) as info:
        make_labeller("lj", max_force=10.0).label(atoms)
    assert info.value.failure_class is FailureClass.IMPLAUSIBLE
    assert PROVENANCE_KEYS <= set(info.value.metadata)



@pytest.mark.slow
def test_secret_from_a_prefect_block_reaches_the_code_and_nothing_else(fake_code, tmp_path, prefect_harness):
    from prefect.blocks.system import Secret

    Secret(value=SECRET).save("alforge-test-licence", overwrite=True)
    env = {"LM_LICENSE_FILE": "$secret:alforge-test-licence"}
    script = "import os, sys; s = os.environ['LM_LICENSE_FILE']; print('licence', s); sys.exit('licence ' + s + ' rejected')"
    failing = ExternalLabeller([sys.executable, "-c", script], input_format="extxyz", output_format="extxyz",
                               env=env, scratch_root=tmp_path / "s")
    with pytest.raises(LabelFailure) as info:
        failing.label(_cu())
    assert "licence ***" in info.value.output_tail, "the code saw the block's value, scrubbed in the tail"
    assert SECRET not in info.value.output_tail + info.value.message
    missing = ExternalLabeller([sys.executable, "-c", "pass"], input_format="extxyz", output_format="extxyz",
                               env={"X": "$secret:no-such-block"}, scratch_root=tmp_path / "s")
    with pytest.raises(LabelFailure, match="Secret block 'no-such-block'"):
        missing.label(_cu())
