"""Real electronic-structure codes behind the labellers: Quantum ESPRESSO, CP2K, xtb, PySCF.

Each force test compares one analytic force component with a central finite difference of the
code's *own* energies, E(x ± h), so it checks our unit conversions and sign conventions as well as
the code. Every test skips, with the reason, when its code is not installed. Run serially with
OMP_NUM_THREADS=1 (the labellers set it for the child processes from ``cores``).
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from alforge.labelling.base import FailureClass, Label, LabelFailure
from alforge.labelling.policy import RetryPolicy, label_with_policy
from alforge.labelling.registry import make_labeller

pytestmark = pytest.mark.dft

PSEUDO_DIR = Path("/usr/share/espresso/pseudo")
needs_pw = pytest.mark.skipif(
    shutil.which("pw.x") is None or not (PSEUDO_DIR / "Si.pbe-rrkj.UPF").is_file(),
    reason="pw.x or /usr/share/espresso/pseudo/Si.pbe-rrkj.UPF missing (apt-get install quantum-espresso "
           "quantum-espresso-data)",
)
needs_cp2k = pytest.mark.skipif(shutil.which("cp2k_shell") is None,
                                reason="cp2k_shell not on PATH (apt-get install cp2k cp2k-data)")
needs_xtb = pytest.mark.skipif(shutil.which("xtb") is None, reason="xtb not on PATH (apt-get install xtb)")

PROVENANCE_KEYS = {"code", "version", "params_hash", "wall_time", "host"}
# Finite-difference steps (Å). Si cells are soft: a 2-point central difference at 0.01 Å has a
# truncation error ~1e-5 eV/Å. Stiff O-H bonds are not (HF water: 6e-4 eV/Å at 0.005 Å, 1e-4 at
# 0.002 Å, scaling as h²), so molecules use the 4-point stencil, whose error is O(h⁴).
STEP = 0.01
MOLECULE_STEP = 0.002

def _si8() -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=1)
    return atoms


def _water() -> Atoms:
    atoms = molecule("H2O")
    atoms.positions[1] += [0.0, 0.05, 0.03]  # off equilibrium, so the force is not ~0
    return atoms


def _fd_force(labeller, atoms: Atoms, atom: int, axis: int, h: float = STEP, points: int = 2) -> float:
    """-dE/dx for one component: 2-point (O(h²)) or 4-point (O(h⁴)) central differences."""
    offsets, weights = {2: ((1, -1), (1, -1)), 4: ((2, 1, -1, -2), (-1, 8, -8, 1))}[points]
    energy = 0.0
    for offset, weight in zip(offsets, weights, strict=True):
        displaced = atoms.copy()
        displaced.positions[atom, axis] += offset * h
        energy += weight * labeller.label(displaced).energy
    return -energy / ({2: 2, 4: 12}[points] * h)

def _check_label(label: Label, n_atoms: int, code: str, periodic: bool) -> None:
    assert PROVENANCE_KEYS <= set(label.metadata) and label.metadata["code"] == code
    assert label.metadata["version"], "code version should be read from the output"
    assert label.forces.shape == (n_atoms, 3)
    assert (label.stress is not None) == periodic


# -- Quantum ESPRESSO --------------------------------------------------------------------------------
QE_INPUT = {"system": {"ecutwfc": 20}, "electrons": {"conv_thr": 1e-10}}
# A shifted 2×2×2 mesh: time reversal halves it to 4 k-points (the unshifted one keeps all 8).
QE_KPTS = {"kpts": (2, 2, 2), "koffset": (1, 1, 1)}


@pytest.fixture(scope="module")
def qe_reference(tmp_path_factory):
    """One pw.x single point of rattled Si8, shared by the force and adapter tests."""
    if shutil.which("pw.x") is None:
        pytest.skip("pw.x not on PATH")
    labeller = make_labeller("espresso", input_data=QE_INPUT, **QE_KPTS, scratch_root=tmp_path_factory.mktemp("qe"))
    return labeller, labeller.label(_si8())


@needs_pw
def test_espresso_si8_forces_match_finite_differences(qe_reference):
    labeller, label = qe_reference
    _check_label(label, 8, "espresso", periodic=True)
    assert label.metadata["version"].startswith("6.")
    assert labeller.pseudopotentials_for(_si8()) == {"Si": "Si.pbe-rrkj.UPF"}
    # Tolerance 2e-3 eV/Å (norm-conserving PP, conv_thr 1e-10 Ry); seen here: 2.3e-4.
    assert _fd_force(labeller, _si8(), 0, 0) == pytest.approx(label.forces[0, 0], abs=2e-3)


@needs_pw
def test_external_adapter_reproduces_espresso_path(qe_reference, tmp_path):
    _, reference = qe_reference
    template = tmp_path / "si.pwi"
    template.write_text(
        "&CONTROL\n  calculation = 'scf'\n  tprnfor = .true.\n  tstress = .true.\n  outdir = '.'\n"
        "  pseudo_dir = '{pseudo_dir}'\n/\n"
        "&SYSTEM\n  ibrav = 0\n  nat = {natoms}\n  ntyp = {ntypes}\n  ecutwfc = 20\n/\n"
        "&ELECTRONS\n  conv_thr = 1e-10\n/\n"
        "ATOMIC_SPECIES\nSi 28.085 Si.pbe-rrkj.UPF\n"
        "K_POINTS automatic\n2 2 2 1 1 1\n"
        "CELL_PARAMETERS angstrom\n{cell}\n"
        "ATOMIC_POSITIONS angstrom\n{species_positions}\n"
    )
    labeller = make_labeller(
        "external", command=["pw.x", "-in", "{input}"], input_template=template, input_file="si.pwi",
        template_values={"pseudo_dir": str(PSEUDO_DIR)}, stdout_file="si.pwo", output_format="espresso-out",
        not_converged_pattern=r"convergence NOT achieved", version_pattern=r"Program PWSCF\s+v\.(\S+)",
        name="pw", scratch_root=tmp_path / "scratch",
    )
    label = labeller.label(_si8())
    assert label.metadata["version"] == reference.metadata["version"]
    assert label.energy == pytest.approx(reference.energy, abs=1e-6)
    np.testing.assert_allclose(label.forces, reference.forces, atol=1e-6)
    np.testing.assert_allclose(label.stress, reference.stress, atol=1e-6)


@needs_pw
def test_espresso_scf_non_convergence_is_read_from_output(tmp_path):
    labeller = make_labeller("espresso", input_data={"ecutwfc": 20, "electron_maxstep": 1}, kpts=(1, 1, 1),
                             scratch_root=tmp_path)
    with pytest.raises(LabelFailure) as info:
        labeller.label(_si8())
    failure = info.value
    assert failure.failure_class is FailureClass.SCF_NOT_CONVERGED
    assert "convergence NOT achieved" in failure.message  # mid-output: quoted, since not in the tail
    assert (Path(failure.metadata["scratch"]) / "espresso.pwi").is_file()


@needs_pw
def test_espresso_timeout_and_missing_pseudopotential(tmp_path):
    slow = make_labeller("espresso", input_data=QE_INPUT, kpts=(4, 4, 4), timeout=0.5, scratch_root=tmp_path)
    with pytest.raises(LabelFailure) as info:
        slow.label(_si8())
    assert info.value.failure_class is FailureClass.TIMEOUT
    no_pp = make_labeller("espresso", input_data=QE_INPUT, scratch_root=tmp_path)
    with pytest.raises(LabelFailure, match="no PBE pseudopotential for element 'Xe'") as info:
        no_pp.label(Atoms("Xe", cell=np.eye(3) * 5, pbc=True))
    assert info.value.failure_class is FailureClass.CRASH


# -- CP2K --------------------------------------------------------------------------------------------
@needs_cp2k
def test_cp2k_si8_gamma_forces_match_finite_differences(tmp_path):
    # SZV basis at 200 Ry: this test checks the interface (units, signs, parsing), and the small
    # basis makes its three single points ~3x cheaper than DZVP (the default, exercised below).
    labeller = make_labeller("cp2k", basis_set="SZV-MOLOPT-SR-GTH", cutoff_ry=200, scratch_root=tmp_path)
    label = labeller.label(_si8())
    _check_label(label, 8, "cp2k", periodic=True)
    assert label.metadata["version"].startswith("20")
    # Tolerance 5e-3 eV/Å: GPW grids make energies not exactly translation-smooth; seen: 5.7e-4.
    assert _fd_force(labeller, _si8(), 0, 0) == pytest.approx(label.forces[0, 0], abs=5e-3)


@needs_cp2k
def test_cp2k_scf_non_convergence_is_read_from_output(tmp_path):
    # Default basis and potentials (DZVP-MOLOPT-SR-GTH / GTH-PBE), stopped after two SCF steps.
    with pytest.raises(LabelFailure) as info:
        make_labeller("cp2k", cutoff_ry=200, max_scf=2, scratch_root=tmp_path).label(_si8())
    assert info.value.failure_class is FailureClass.SCF_NOT_CONVERGED
    assert "SCF run NOT converged" in info.value.message


@needs_cp2k
def test_cp2k_abort_message_names_the_problem(tmp_path):
    with pytest.raises(LabelFailure, match=r"basis set <NO-SUCH-BASIS> for element <Si>") as info:
        make_labeller("cp2k", basis_set="NO-SUCH-BASIS", scratch_root=tmp_path).label(_si8())
    assert info.value.failure_class is FailureClass.CRASH


# -- xtb ---------------------------------------------------------------------------------------------
@needs_xtb
def test_xtb_water_forces_match_finite_differences(tmp_path):
    labeller = make_labeller("xtb", accuracy=0.01, scratch_root=tmp_path)
    water = _water()
    label = labeller.label(water)
    _check_label(label, 3, "xtb", periodic=False)
    # Tolerance 1e-4 eV/Å with --acc 0.01; seen: 6e-8.
    fd = _fd_force(labeller, water, 1, 1, h=MOLECULE_STEP, points=4)
    assert fd == pytest.approx(label.forces[1, 1], abs=1e-4)


@needs_xtb
def test_xtb_non_convergence_and_periodic_refusal(tmp_path):
    with pytest.raises(LabelFailure) as info:
        make_labeller("xtb", iterations=2, scratch_root=tmp_path).label(_water())
    assert info.value.failure_class is FailureClass.SCF_NOT_CONVERGED
    assert "did not converge" in info.value.message
    with pytest.raises(LabelFailure, match="molecules only") as info:
        make_labeller("xtb", scratch_root=tmp_path).label(_si8())
    assert info.value.failure_class is FailureClass.CRASH


# -- PySCF -------------------------------------------------------------------------------------------
def test_pyscf_water_forces_match_finite_differences(tmp_path):
    pytest.importorskip("pyscf", reason="PySCF not installed (pip install pyscf)")
    labeller = make_labeller("pyscf", method="PBE", basis="def2-SVP", scratch_root=tmp_path)
    water = _water()
    label = labeller.label(water)
    _check_label(label, 3, "pyscf", periodic=False)
    # Tolerance 1e-3 eV/Å: PySCF's DFT gradients omit the grid-weight response; seen: 9e-5.
    fd = _fd_force(labeller, water, 1, 1, h=MOLECULE_STEP, points=4)
    assert fd == pytest.approx(label.forces[1, 1], abs=1e-3)
    hf = make_labeller("pyscf", method="HF", basis="def2-SVP", scratch_root=tmp_path)
    hf_label = hf.label(water)
    # HF has no grid, so only the SCF threshold limits agreement: tolerance 2e-5 eV/Å; seen: 2e-6.
    fd = _fd_force(hf, water, 1, 1, h=MOLECULE_STEP, points=4)
    assert fd == pytest.approx(hf_label.forces[1, 1], abs=2e-5)


def test_pyscf_non_convergence_is_healed_by_the_default_retry(tmp_path):
    pytest.importorskip("pyscf", reason="PySCF not installed (pip install pyscf)")
    label, records = label_with_policy(
        functools.partial(make_labeller, "pyscf"), _water(), RetryPolicy.for_labeller("pyscf"),
        {"max_cycle": 2, "scratch_root": tmp_path},
    )
    first, second = records
    assert first.failure_class is FailureClass.SCF_NOT_CONVERGED and first.decision == "retry"
    assert "SCF not converged" in first.output_tail  # PySCF's own log line
    assert second.failure_class is None and second.kwargs["max_cycle"] == 4 and second.kwargs["newton"]
    assert label is not None and label.metadata["code"] == "pyscf"
